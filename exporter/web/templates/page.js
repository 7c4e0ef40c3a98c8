// The page's plain JavaScript, over the links the server rendered. Without it every link
// still downloads (whole datasets, files); with it the filter builder writes the links'
// query strings, links are checked before they are followed, commands can be copied,
// and big exports can be prepared on the server with their progress shown.
(() => {
  "use strict";
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const datasets = new Map(data.datasets.map((d) => [d.name, d]));
  // The operators come from the server's table: name, label, hint, whether a list; how
  // each takes its operand (a value, a list, a pattern, keywords) comes beside them.
  const operators = new Map(data.operators.map((o) => [o.name, o]));
  const operands = data.operands || {};
  const kindOf = (op) => (operands[op] || {}).kind || (operators.get(op).list ? "list" : "typed");
  const live = document.getElementById("live");
  const say = (text) => { if (live) { live.textContent = ""; live.textContent = text; } };

  // Commas, colons and parentheses stay readable; a quote is encoded too, though the
  // commands quote every argument (shellQuote) anyway.
  const encode = (s) => encodeURIComponent(s).replace(/%2C/g, ",").replace(/%3A/g, ":")
    .replace(/'/g, "%27");
  // As Python's shlex.quote (the page's server-rendered commands): words of safe
  // characters stay as they are, anything else goes between single quotes.
  const shellQuote = (s) => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, "'\\''")}'`);

  // A column named like a parameter of the grammar (limit, ~by...) is filtered by its
  // quoted name, as in SQL: "limit"=eq.5.
  const reserved = new Set(data.reserved);
  const filterName = (col) => (reserved.has(col) || col.startsWith('"')
    ? `"${col.replace(/"/g, '""')}"` : col);

  // A list's item in PostgREST's syntax: quoted when it holds what the list syntax reads
  // (commas, parentheses, quotes, backslashes, spaces at either end), so commas are data.
  const listItem = (v) => (/[,()"\\]|^\s|\s$/.test(v) || v === ""
    ? `"${v.replace(/\\/g, "\\\\").replace(/"/g, '\\"')}"` : v);

  const bytes = (n) => {
    const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let i = 0; let x = n;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
    return i === 0 ? `${n} bytes` : `${x.toFixed(1)} ${units[i]}`;
  };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => { if (v !== undefined) node.setAttribute(k, v); });
    children.forEach((c) => node.append(c));
    return node;
  }

  function select(cls, values, labels, label) {
    const s = el("select", { class: cls, "aria-label": label });
    values.forEach((v, i) => s.append(el("option", { value: v }, labels ? labels[i] : v)));
    return s;
  }

  // --- copy buttons ---------------------------------------------------------------------
  // Each copies the text of the element just before it (a command, a digest).
  async function copy(button) {
    const text = button.previousElementSibling.textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
      say("Copied to the clipboard");
    } catch (e) {
      // No clipboard (an insecure origin, a refused permission): select it for Ctrl-C.
      const range = document.createRange();
      range.selectNodeContents(button.previousElementSibling);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      button.textContent = "Selected";
      say("Could not copy: the text is selected, press Ctrl+C");
    }
    setTimeout(() => { button.textContent = "Copy"; }, 2000);
  }
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button.copy");
    if (button) copy(button);
  });
  const reveal = (root) => root.querySelectorAll("button.copy[hidden]").forEach((b) => { b.hidden = false; });
  const copyable = (cls, text, label) => el("div", { class: "copyable" },
    el(cls === "hex" ? "code" : "pre", { class: cls === "hex" ? "hex" : `cmd ${cls}` }, text),
    el("button", { type: "button", class: "copy small", "aria-label": label }, "Copy"));

  // --- links checked before they are followed -------------------------------------------
  // Why check first rather than serve an error page to browser navigations: these links
  // carry `download`, and Chromium turns any non-2xx answer to a download into a
  // cancelled download without showing its body, so an error page would never be seen.
  // HEAD on an export runs the same checks as the GET (the query's grammar, every value
  // against its column's type, access) without running the query, and HEAD on a file
  // the same checks as its GET; when HEAD fails, the GET (which fails the same way before
  // any row or byte is read) gives the server's message to show.
  async function problem(url) {
    let head;
    try {
      head = await fetch(url, { method: "HEAD", cache: "no-store" });
    } catch (e) {
      return `The server could not be reached (${e.message}).`;
    }
    if (head.ok) return null;
    const controller = new AbortController();
    let message = `${head.status} ${head.statusText}`.trim();
    try {
      const r = await fetch(url, { cache: "no-store", signal: controller.signal });
      if (r.ok) { controller.abort(); return null; } // it works now: download it
      const body = await r.json();
      if (body && body.error && body.error.message) message = `${r.status}: ${body.error.message}`;
    } catch (e) { /* keep the HEAD's status line */ }
    return message;
  }

  async function follow(link, box) {
    if (link.dataset.checking) return;
    link.dataset.checking = "1";
    link.setAttribute("aria-busy", "true");
    try {
      const why = await problem(link.href);
      if (box) {
        box.hidden = why === null;
        box.textContent = why === null ? "" : `Not downloaded. ${why}`;
      }
      if (why === null) {
        link.dataset.checked = "1";
        link.click(); // now the browser's own download, as without this script
      }
    } finally {
      delete link.dataset.checking;
      link.removeAttribute("aria-busy");
    }
  }

  document.addEventListener("click", (event) => {
    const link = event.target.closest("a[download]");
    if (!link || event.defaultPrevented) return;
    if (link.dataset.checked) { delete link.dataset.checked; return; }
    if (event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    const card = link.closest("article.dataset, li.prepared-item");
    const box = card ? card.querySelector(".export-error")
      : document.querySelector("#files .files-error");
    follow(link, box);
  });

  // --- the filter builder ---------------------------------------------------------------
  const INPUT_TYPES = { number: "number", date: "date", datetime: "datetime-local",
    datetimetz: "datetime-local", time: "time" };

  function valueField(column, op) {
    const kind = kindOf(op);
    const label = `Value for ${column.name}`;
    if (kind === "keyword") {
      const words = operands[op].keywords.filter((k) => column.input === "boolean" || !k.boolean);
      return select("value", words.map((k) => k.value), words.map((k) => k.label), label);
    }
    if (kind === "list") {
      return el("textarea", { class: "value", rows: "3", "aria-label": `${label}, one a line`,
        placeholder: "one value a line", spellcheck: "false" });
    }
    if (kind === "typed" && column.input === "boolean") {
      return select("value", ["true", "false"], null, label);
    }
    const type = kind === "typed" ? (INPUT_TYPES[column.input] || "text") : "text";
    const attrs = { class: "value", type, "aria-label": column.input === "datetimetz" ? `${label} (UTC)` : label,
      placeholder: operators.get(op).hint || undefined };
    if (type === "number") { attrs.step = "any"; attrs.inputmode = "decimal"; }
    if (type === "datetime-local" || type === "time") attrs.step = "1";
    return el("input", attrs);
  }

  // The operand as the URL writes it, or null when there is none yet.
  function operand(column, op, field) {
    const kind = kindOf(op);
    if (kind === "list") {
      const items = field.value.split(/\r?\n/).filter((v) => v.trim() !== "");
      return items.length ? `(${items.map(listItem).join(",")})` : null;
    }
    let value = kind === "pattern" ? field.value : field.value.trim();
    if (!value) return null;
    // A datetime-local field has no zone: the page says UTC, and so does the value.
    if (kind === "typed" && column.input === "datetimetz") value += "Z";
    return value;
  }

  function filterRow(ds, update) {
    const columns = new Map(ds.columns.map((c) => [c.name, c]));
    const column = select("f-col", ds.columns.map((c) => c.name), null, "Column");
    // Each column offers the conditions its type has; one chosen stays if the next has it.
    const op = select("f-op", [], null, "Condition");
    const offer = () => {
      const kept = op.value;
      const names = columns.get(column.value).operators || data.operators.map((o) => o.name);
      op.replaceChildren(...names.map((n) => el("option", { value: n }, operators.get(n).label)));
      if (names.includes(kept)) op.value = kept;
    };
    offer();
    let value = valueField(columns.get(column.value), op.value);
    const remove = el("button", { type: "button", class: "small", "aria-label": "Remove this filter" }, "✕");
    // A datetime-local field shows no zone: the value is taken as UTC, and says so.
    const zone = el("span", { class: "zone", "aria-hidden": "true" }, "UTC");
    const row = el("div", { class: "row filter", role: "group", "aria-label": "Filter" },
      column, op, value, zone, remove);
    const showZone = () => {
      zone.hidden = !(kindOf(op.value) === "typed" && columns.get(column.value).input === "datetimetz");
    };
    showZone();
    const refit = () => {
      const next = valueField(columns.get(column.value), op.value);
      // A value typed for one field stays when the next is of the same kind.
      if (next.tagName === value.tagName && next.type === value.type) {
        next.value = value.value;
      }
      value.replaceWith(next);
      value = next;
      showZone();
      update();
    };
    column.addEventListener("change", () => { offer(); refit(); });
    op.addEventListener("change", refit);
    remove.addEventListener("click", () => { row.remove(); update(); });
    row.operand = () => operand(columns.get(column.value), op.value, value);
    return row;
  }

  function query(box, ds) {
    const params = [];
    box.querySelectorAll(".filter").forEach((row) => {
      const value = row.operand();
      if (value === null) return;
      params.push([filterName(row.querySelector(".f-col").value),
        `${row.querySelector(".f-op").value}.${value}`]);
    });
    const picked = [...box.querySelectorAll(".pick:checked")].map((c) => c.value);
    if (picked.length) params.push(["select", picked.join(",")]);
    const orderCol = box.querySelector(".order-col").value;
    const limit = box.querySelector(".limit").value.trim();
    if (orderCol) {
      params.push(["order", `${orderCol}.${box.querySelector(".order-dir").value}`]);
    } else if (limit && ds.default_order && ds.default_order.length) {
      // Without an order a limit gives whatever rows PostgreSQL reads first: the key
      // (or the first column) makes it the same rows every time.
      params.push(["order", ds.default_order.join(",")]);
    }
    if (limit) params.push(["limit", limit]);
    return params.map(([k, v]) => `${encode(k)}=${encode(v)}`).join("&");
  }

  function setUp(card, ds) {
    const box = card.querySelector(".builder");
    const names = ds.columns.map((c) => c.name);
    const id = card.getAttribute("aria-labelledby");
    const filters = el("div", { class: "filters" });
    const add = el("button", { type: "button", class: "small add" }, "+ Filter");
    const picks = el("fieldset", {}, el("legend", {}, "Columns (none ticked: all)"));
    names.forEach((n) => picks.append(el("label", {}, el("input", { type: "checkbox", class: "pick", value: n }), " ", n)));
    // One format choice, in the download bar: the download link, the commands and the
    // prepared download all follow it (without this script, one link a format).
    const format = select("cmd-format", data.formats, data.formats.map((f) => f.toUpperCase()));
    format.id = `${id}-format`;
    const bar = card.querySelector(".downloads");
    bar.prepend(el("label", { for: format.id }, "Format"), format);
    const limit = el("input", { type: "number", class: "limit", min: "1", inputmode: "numeric", id: `${id}-limit` });
    const order = select("order-col", ["", ...names],
      [ds.default_order.length ? `default (${ds.default_order.join(", ")} when limited)` : "none", ...names]);
    order.id = `${id}-order`;
    const direction = select("order-dir", ["asc", "desc"], ["ascending", "descending"], "Direction");
    box.append(el("details", { class: "choose" },
      el("summary", {}, "Choose rows"),
      filters, el("div", { class: "row" }, add), picks,
      el("div", { class: "row" }, el("label", { for: order.id }, "Order by"), order, direction),
      el("div", { class: "row" }, el("label", { for: limit.id }, "Limit"), limit)));
    // The bar stays in view (sticky) only while rows are being chosen.
    const choose = box.querySelector("details.choose");
    choose.addEventListener("toggle", () => { card.classList.toggle("building", choose.open); });

    const update = () => {
      const qs = query(box, ds);
      const url = (fmt) => ds.urls[fmt] + (qs ? `?${qs}` : "");
      card.querySelectorAll("a.export").forEach((a) => {
        a.href = url(a.dataset.format);
        a.hidden = a.dataset.format !== format.value;
        a.textContent = `Download ${a.dataset.format.toUpperCase()}`;
      });
      const target = url(format.value);
      card.querySelector(".curl").textContent =
        `curl -fOJ -H "Authorization: Bearer $EXPORTER_TOKEN" ${shellQuote(target)}`;
      card.querySelector(".wget").textContent =
        `wget --content-disposition --header="Authorization: Bearer $EXPORTER_TOKEN" ${shellQuote(target)}`;
      card.querySelector(".prepare").textContent = `Prepare ${format.value.toUpperCase()} download`;
      const status = card.querySelector(".prepare-status");
      status.textContent = "";
      status.classList.remove("error");
      const error = card.querySelector(".export-error");
      error.hidden = true; // what it said was about the links before this change
      error.textContent = "";
    };
    add.addEventListener("click", () => {
      const row = filterRow(ds, update);
      filters.append(row);
      update();
      row.querySelector(".f-col").focus();
    });
    box.addEventListener("input", update);
    box.addEventListener("change", update);
    format.addEventListener("change", update); // in the bar, outside the builder
    box.hidden = false;
    const prepare = card.querySelector(".prepare");
    prepare.hidden = false;
    prepare.addEventListener("click", () => start(card, url(format.value)));
    function url(fmt) { const qs = query(box, ds); return ds.urls[fmt] + (qs ? `?${qs}` : ""); }
    update();
  }

  // --- prepared (stored) exports --------------------------------------------------------
  // Each shows under the card of its dataset, where it was asked for, with Cancel while it
  // runs and Delete once done (DELETE /exports/{id}: the cookie counts for it from this
  // page's own origin).
  const shown = new Map();
  const cardOf = (name) => [...document.querySelectorAll("article.dataset")]
    .find((c) => c.dataset.dataset === name);

  async function remove(item, li, error) {
    let r;
    try {
      r = await fetch(item.status_url, { method: "DELETE", cache: "no-store" });
    } catch (e) {
      error.hidden = false;
      error.textContent = `Not done: the server could not be reached (${e.message}).`;
      return;
    }
    if (r.status !== 204) {
      let message = r.statusText;
      try { message = (await r.json()).error.message; } catch (e) { /* the status line */ }
      error.hidden = false;
      error.textContent = `Not done. ${r.status}: ${message}`;
      return;
    }
    if (item.status === "running") {
      say(`${item.filename || item.dataset}: cancelled`);
      return; // its watch hears "cancelled" and shows it, with Delete
    }
    shown.delete(item.id);
    const list = li.parentElement;
    li.remove();
    if (list && !list.children.length) list.hidden = true;
    say(`${item.filename || item.dataset}: deleted`);
  }

  // Started here: on top. Listed at load (newest first): below what is there, which
  // can only be newer, started while the listing was on its way.
  function show(item, listed) {
    const home = cardOf(item.dataset);
    if (!home) return;
    const list = home.querySelector(".prepared-list");
    list.hidden = false;
    let li = shown.get(item.id);
    if (!li) {
      li = el("li", { class: "prepared-item", "data-id": item.id });
      shown.set(item.id, li);
      if (listed) list.append(li); else list.prepend(li);
    }
    const name = item.filename || item.dataset;
    const title = el("p", { class: "prepared-name" }, el("strong", {}, name));
    const error = el("div", { class: "export-error notice error", role: "alert", hidden: "" });
    const action = (label) => {
      const button = el("button", { type: "button", class: "small", "aria-label": `${label} ${name}` }, label);
      button.addEventListener("click", () => remove(item, li, error));
      return button;
    };
    li.replaceChildren(title);
    if (item.status === "running") {
      const p = item.progress || {};
      const percent = p.percent;
      const bar = el("progress", { max: "100", "aria-label": `Progress of ${name}` });
      if (percent !== null && percent !== undefined) bar.value = percent;
      const rows = (p.rows || 0).toLocaleString("en");
      li.append(el("p", { class: "progress" }, bar, " ",
        `${rows} rows${percent !== null && percent !== undefined ? ` (${percent}%)` : ""}, `
        + `${bytes(p.bytes || 0)} so far`), item.status_url ? action("Cancel") : "", error);
    } else if (item.status === "complete") {
      const link = el("a", { href: item.file_url, download: "", class: "button" }, `Download ${name}`);
      li.append(el("p", { class: "done actions" }, link, " ",
        el("span", { class: "size", title: `${item.bytes.toLocaleString("en")} bytes` }, bytes(item.bytes)),
        `, ${item.rows.toLocaleString("en")} rows`, action("Delete")), error,
      el("p", { class: "label" }, "SHA-256"),
      copyable("hex", item.sha256, `Copy the SHA-256 of ${name}`),
      copyable("check", `echo ${shellQuote(`${item.sha256}  ${name}`)} | sha256sum -c`,
        `Copy the command that checks ${name}`));
    } else {
      li.append(el("p", { class: "actions" }, el("span", { class: "notice error" },
        `${item.status}: ${item.error || "no file"}`), action("Delete")), error);
    }
  }

  async function watch(statusUrl) {
    for (;;) {
      let r;
      try {
        r = await fetch(statusUrl, { cache: "no-store" });
      } catch (e) {
        await new Promise((done) => { setTimeout(done, 2000); });
        continue;
      }
      let body = null;
      try { body = await r.json(); } catch (e) { /* shown below */ }
      if (r.status === 202 && body) {
        show(body);
        const wait = Math.min(10, Math.max(1, Number(r.headers.get("retry-after")) || 1));
        await new Promise((done) => { setTimeout(done, wait * 1000); });
        continue;
      }
      if (body && body.id) {
        show(body);
        const text = body.status === "complete" ? `${body.filename} is ready, below`
          : `${body.filename} ${body.status}`;
        const home = cardOf(body.dataset);
        const status = home && home.querySelector(".prepare-status");
        if (status && status.dataset.id === body.id) status.textContent = text;
        say(text);
      }
      return;
    }
  }

  async function start(card, exportUrl) {
    const box = card.querySelector(".export-error");
    const status = card.querySelector(".prepare-status");
    box.hidden = true;
    status.classList.remove("error");
    status.textContent = "Asking the server…";
    let r;
    try {
      // A GET with Prefer: the page's cookie counts for reads only, so not POST /exports.
      r = await fetch(exportUrl, { headers: { Prefer: "respond-async" }, cache: "no-store" });
    } catch (e) {
      box.hidden = false;
      box.textContent = `Not started: the server could not be reached (${e.message}).`;
      status.textContent = "Not started (see below)";
      status.classList.add("error");
      return;
    }
    let body = null;
    try { body = await r.json(); } catch (e) { /* not JSON */ }
    if (r.status !== 202 || !body || !body.status_url) {
      box.hidden = false;
      const message = body && body.error ? body.error.message : r.statusText;
      box.textContent = `Not started. ${r.status}: ${message}`;
      status.textContent = "Not started (see below)";
      status.classList.add("error");
      return;
    }
    show({ id: body.id, status: "running", dataset: card.dataset.dataset, progress: {},
      status_url: body.status_url });
    status.dataset.id = body.id;
    status.textContent = "Preparing: its progress is below";
    say("Preparing the download");
    watch(body.status_url);
  }

  async function listPrepared() {
    if (!data.principal || !document.querySelector("article.dataset")) return;
    let r;
    try {
      // Prepared downloads only: streamed exports' copies (kind "streamed") are the
      // resume machinery's, and would fill the page.
      r = await fetch(`${data.root}/exports?kind=async&limit=20`, { cache: "no-store" });
    } catch (e) { return; }
    if (!r.ok) return;
    const body = await r.json();
    // The page user's own: an admin's listing has everyone's.
    body.exports.filter((x) => x.principal === data.principal).forEach((x) => {
      show(x, true);
      if (x.status === "running") watch(x.status_url);
    });
  }

  document.querySelectorAll("article.dataset").forEach((card) => {
    const ds = datasets.get(card.dataset.dataset);
    if (ds) setUp(card, ds);
  });
  reveal(document);
  listPrepared();
})();
