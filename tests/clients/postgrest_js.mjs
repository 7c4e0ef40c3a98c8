// @supabase/postgrest-js against /datasets, created as its README shows (headers passed
// whole), from the folder npm installed it into: prints what each call returned, as JSON,
// for tests/test_postgrest_clients.py to compare with SQL.
//
//     node postgrest_js.mjs NODE_MODULES_PARENT BASE_URL TOKEN
import { createRequire } from "node:module";

const [folder, baseUrl, token] = process.argv.slice(2);
const { PostgrestClient } = createRequire(`${folder}/`)("@supabase/postgrest-js");

const client = new PostgrestClient(baseUrl, { headers: { Authorization: `Bearer ${token}` } });

function rows({ data, error }) {
  if (error) throw new Error(`unexpected error: ${JSON.stringify(error)}`);
  return data;
}

const out = {};
out.select = rows(await client.from("orders").select("id,customer,amount").lt("id", 6));
out.eq = rows(await client.from("orders").select("*").eq("id", 7));
out.or = rows(await client.from("orders").select("id").or("id.eq.5,id.gt.19998").order("id"));
out.order = rows(await client.from("orders").select("id,amount").lt("id", 20)
  .order("amount", { ascending: false }).order("id"));
const page = await client.from("orders").select("id", { count: "exact" }).gte("id", 1000)
  .order("id").range(10, 19);
out.range = { data: rows(page), count: page.count };
const failed = await client.from("orders").select("id").eq("id", "not-a-number");
out.error = failed.error && {
  message: failed.error.message, code: failed.error.code, details: failed.error.details,
  hint: failed.error.hint, status: failed.status,
};
console.log(JSON.stringify(out));
