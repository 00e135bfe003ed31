/* The browsable REST API page: renders /api/v1/openapi.json as a list of operations,
 * grouped by tag, with parameters, request bodies and responses. Served from the package
 * (no CDN, no external script). Loaded before app.js (window.labqPages.apidocs). */
"use strict";

(function () {
  window.labqPages = window.labqPages || {};
  const METHODS = ["get", "post", "put", "patch", "delete"];

  window.labqPages.apidocs = async function pageApiDocs() {
    const L = window.labq;
    const { el, $, api, setText } = L;
    let doc;
    try {
      doc = await api(`${L.API}/openapi.json`);
    } catch (err) {
      L.notify(`Could not load the API description: ${err.message}`, "error");
      return;
    }
    const info = doc.info || {};
    setText($("#api-title"), `${info.title || "labq"} REST API`);
    setText($("#api-info"), `Version ${info.version || "?"} · OpenAPI ${doc.openapi || "3"}`);

    const byTag = new Map();
    for (const [path, item] of Object.entries(doc.paths || {})) {
      for (const method of METHODS) {
        const op = item[method];
        if (!op) continue;
        const tag = (op.tags && op.tags[0]) || "other";
        if (!byTag.has(tag)) byTag.set(tag, []);
        byTag.get(tag).push({ path, method, op, shared: item.parameters || [] });
      }
    }
    const box = $("#api-ops");
    for (const [tag, ops] of byTag) {
      const section = el("section", { class: "card", dataset: { tag } },
        el("h2", { text: tag }));
      for (const o of ops) section.append(operation(o));
      box.append(section);
    }

    function resolve(node, depth) {
      if (!node || typeof node !== "object" || depth > 6) return node;
      if (node.$ref && typeof node.$ref === "string" && node.$ref.startsWith("#/")) {
        const target = node.$ref.slice(2).split("/").reduce((n, k) => (n ? n[k] : undefined), doc);
        return resolve(target, depth + 1);
      }
      if (Array.isArray(node)) return node.map((n) => resolve(n, depth + 1));
      const out = {};
      for (const [k, v] of Object.entries(node)) out[k] = resolve(v, depth + 1);
      return out;
    }

    function schemaBlock(schema) {
      return el("pre", { class: "api-schema", text: JSON.stringify(resolve(schema, 0), null, 2) });
    }

    function operation({ path, method, op, shared }) {
      const details = el("details", { class: "api-op", dataset: { method, path } },
        el("summary", {},
          el("span", { class: `api-method api-method-${method}`, text: method }), " ",
          el("span", { class: "api-path", text: path }),
          op.summary ? el("span", { class: "muted", text: ` — ${op.summary}` }) : null));
      if (op.description) details.append(el("p", { text: op.description }));
      const params = [...shared, ...(op.parameters || [])].map((p) => resolve(p, 0));
      if (params.length) {
        details.append(el("h3", { class: "small-title", text: "Parameters" }),
          el("table", { class: "jobs" },
            el("thead", {}, el("tr", {}, ["Name", "In", "Required", "Description"]
              .map((h) => el("th", { scope: "col", text: h })))),
            el("tbody", {}, params.map((p) => el("tr", {},
              el("td", { class: "mono", text: p.name }), el("td", { text: p.in }),
              el("td", { text: p.required ? "yes" : "no" }),
              el("td", { text: p.description || "" }))))));
      }
      const body = op.requestBody && resolve(op.requestBody, 0);
      if (body && body.content) {
        details.append(el("h3", { class: "small-title", text: "Request body" }));
        for (const [type, media] of Object.entries(body.content)) {
          details.append(el("p", { class: "mono", text: type }));
          if (media.schema) details.append(schemaBlock(media.schema));
        }
      }
      const responses = Object.entries(op.responses || {});
      if (responses.length) {
        details.append(el("h3", { class: "small-title", text: "Responses" }),
          el("ul", {}, responses.map(([code, r]) => el("li", {},
            el("span", { class: "mono", text: code }), " ",
            (resolve(r, 0) || {}).description || ""))));
      }
      return details;
    }
  };
})();
