// The filter builder: plain JavaScript over the links the server rendered. Without it the
// links still download whole datasets; with it they carry a PostgREST-style query string.
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const datasets = new Map(data.datasets.map((d) => [d.name, d]));
  // The operators come from the server's table: name, label, hint, whether a list.
  const operators = new Map(data.operators.map((o) => [o.name, o]));

  // Commas, colons and parentheses stay readable; a quote is encoded so that the URL can
  // stand between single quotes in a shell command.
  const encode = (s) => encodeURIComponent(s).replace(/%2C/g, ",").replace(/%3A/g, ":")
    .replace(/'/g, "%27");

  // A column named like a parameter of the grammar (limit, ~by...) is filtered by its
  // quoted name, as in SQL: "limit"=eq.5.
  const reserved = new Set(data.reserved);
  const filterName = (col) => (reserved.has(col) || col.startsWith('"')
    ? `"${col.replace(/"/g, '""')}"` : col);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    children.forEach((c) => node.append(c));
    return node;
  }

  function select(cls, values, labels) {
    const s = el("select", { class: cls });
    values.forEach((v, i) => s.append(el("option", { value: v }, labels ? labels[i] : v)));
    return s;
  }

  function filterRow(columns, update) {
    const column = select("f-col", columns);
    const op = select("f-op", data.operators.map((o) => o.name),
      data.operators.map((o) => o.label));
    const value = el("input", { class: "value", type: "text", "aria-label": "value" });
    const remove = el("button", { type: "button", class: "small", "aria-label": "remove" }, "✕");
    const row = el("div", { class: "row filter" }, column, op, value, remove);
    const hint = () => { value.placeholder = operators.get(op.value).hint; };
    op.addEventListener("change", hint);
    remove.addEventListener("click", () => { row.remove(); update(); });
    return row;
  }

  function query(box) {
    const params = [];
    box.querySelectorAll(".filter").forEach((row) => {
      const col = row.querySelector(".f-col").value;
      const op = row.querySelector(".f-op").value;
      let value = row.querySelector(".value").value.trim();
      if (!value) return;
      if (operators.get(op).list && !value.startsWith("(")) value = `(${value})`;
      params.push([filterName(col), `${op}.${value}`]);
    });
    const picked = [...box.querySelectorAll(".pick:checked")].map((c) => c.value);
    if (picked.length) params.push(["select", picked.join(",")]);
    const orderCol = box.querySelector(".order-col").value;
    if (orderCol) params.push(["order", `${orderCol}.${box.querySelector(".order-dir").value}`]);
    const limit = box.querySelector(".limit").value.trim();
    if (limit) params.push(["limit", limit]);
    return params.map(([k, v]) => `${encode(k)}=${encode(v)}`).join("&");
  }

  function setUp(card, ds) {
    const box = card.querySelector(".builder");
    const names = ds.columns.map((c) => c.name);
    const filters = el("div", { class: "filters" });
    const add = el("button", { type: "button", class: "small add" }, "+ Filter");
    const picks = el("fieldset", {}, el("legend", {}, "Columns (none ticked: all)"));
    names.forEach((n) => picks.append(el("label", {}, el("input", { type: "checkbox", class: "pick", value: n }), " ", n)));
    const format = select("cmd-format", data.formats, data.formats.map((f) => f.toUpperCase()));
    const limit = el("input", { type: "number", class: "limit", min: "1", inputmode: "numeric", "aria-label": "limit" });
    box.append(el("details", { class: "choose" },
      el("summary", {}, "Choose rows"),
      filters, el("div", { class: "row" }, add), picks,
      el("div", { class: "row" }, "Order by ", select("order-col", ["", ...names], ["—", ...names]),
         select("order-dir", ["asc", "desc"]), " Limit ", limit),
      el("div", { class: "row" }, "Commands for ", format)));

    const update = () => {
      const qs = query(box);
      const url = (fmt) => ds.urls[fmt] + (qs ? `?${qs}` : "");
      card.querySelectorAll("a.export").forEach((a) => { a.href = url(a.dataset.format); });
      const target = url(format.value);
      card.querySelector(".curl").textContent =
        `curl -fOJ -H "Authorization: Bearer $EXPORTER_TOKEN" '${target}'`;
      card.querySelector(".wget").textContent =
        `wget --content-disposition --header="Authorization: Bearer $EXPORTER_TOKEN" '${target}'`;
    };
    add.addEventListener("click", () => { filters.append(filterRow(names, update)); update(); });
    box.addEventListener("input", update);
    box.addEventListener("change", update);
    box.hidden = false;
  }

  document.querySelectorAll("article.dataset").forEach((card) => {
    const ds = datasets.get(card.dataset.dataset);
    if (ds) setUp(card, ds);
  });
})();
