"use strict";
// The medhive console: one page, hash routes (#/jobs, #/jobs/ID, #/nodes, #/audit,
// #/tenants), everything read through the job API with the signed-in token. The token
// lives in this tab's sessionStorage only and goes out as a bearer header; no cookie.
// Live views follow the audit's server-sent events (read with fetch, which can send
// the header), resume after the last record seen, and say so when the link is down.

const STATES = ["submitted", "queued", "staging", "dispatched", "running", "succeeded",
  "failed", "timed_out", "cancelled", "lost"];
const ENDED = new Set(["succeeded", "failed", "timed_out", "cancelled", "lost"]);
const PAGE_SIZE = 50;
const AUDIT_ROWS_KEPT = 1000;
const AUDIT_BACK = 200; // records shown before the live ones, and per "Earlier records"
const NODES_REFRESH_MS = 5000;

// -- session ------------------------------------------------------------------------

const session = {
  get token() { return sessionStorage.getItem("medhive.token"); },
  get me() { return JSON.parse(sessionStorage.getItem("medhive.me") || "null"); },
  get operator() { return this.me?.role === "operator"; },
  save(token, me) {
    sessionStorage.setItem("medhive.token", token);
    sessionStorage.setItem("medhive.me", JSON.stringify(me));
  },
  clear() {
    sessionStorage.removeItem("medhive.token");
    sessionStorage.removeItem("medhive.me");
  },
};

function signOut(why) {
  session.clear();
  signInNotice = why || "";
  if (location.hash === "#/signin") route(); else location.hash = "#/signin";
}
let signInNotice = "";

// -- small helpers ------------------------------------------------------------------

/** What may be a child: nodes and text; null, undefined, false and "" are left out. */
function kept(children) {
  return children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false && c !== "")
    .map((c) => (c instanceof Node ? c : String(c)));
}

/** Replace an element's children (text is always text, never markup). */
function put(el, ...children) { el.replaceChildren(...kept(children)); }

/** An element with attributes and children; text is always text, never markup. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  el.append(...kept(children));
  return el;
}

/** A time in the browser's own zone, with the exact instant for machines. */
function timeEl(iso) {
  return iso ? h("time", { datetime: iso }, new Date(iso).toLocaleString()) : "—";
}

function badge(state) {
  return h("span", { class: `state ${state}`, "data-state": state }, state.replace("_", " "));
}

function jobHref(id) { return `#/jobs/${encodeURIComponent(id)}`; }

function delay(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

function megabytes(bytes) {
  if (bytes < 1000) return `${bytes} bytes`;
  if (bytes < 1e6) return `${(bytes / 1e3).toFixed(1)} kB`;
  return `${(bytes / 1e6).toFixed(bytes < 1e7 ? 2 : 0)} MB`;
}

// -- the connection banner: a broken link is shown, not hidden ------------------------

const connection = {
  show(kind, text) {
    const banner = document.getElementById("connection");
    banner.className = `connection ${kind}`;
    banner.textContent = text;
  },
  clear() { this.show("", ""); },
};

// -- the API --------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function errorDetail(response) {
  try { return (await response.json()).error.detail; } catch { return response.statusText; }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${session.token}`, ...(options.headers || {}) };
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    connection.show("lost", "medhive cannot be reached: the network or the scheduler is down.");
    throw new ApiFailure(0, "medhive cannot be reached");
  }
  if (document.getElementById("connection").classList.contains("lost") && !options.quiet) {
    connection.clear();
  }
  if (response.status === 401) {
    signOut("The token was refused: it is unknown or revoked.");
    throw new ApiFailure(401, "signed out");
  }
  if (!response.ok) throw new ApiFailure(response.status, await errorDetail(response));
  return response;
}

async function getJson(path) { return (await api(path)).json(); }

/** Audit records as they are stored, from `after` on, live; reconnects by itself and
 * goes on after the last record it passed on, so none is missed or shown twice. */
class LiveStream {
  constructor(filters, after, onRecord) {
    this.filters = Object.fromEntries(Object.entries(filters).filter(([, v]) => v));
    this.last = after;
    this.onRecord = onRecord;
    this.controller = new AbortController();
    this.stopped = false;
    this.run();
  }

  stop() { this.stopped = true; this.controller.abort(); }

  async run() {
    let failures = 0;
    while (!this.stopped) {
      try {
        const query = new URLSearchParams(this.filters);
        const response = await fetch(`/v1/events/stream?${query}`, {
          headers: { Authorization: `Bearer ${session.token}`, "Last-Event-ID": String(this.last) },
          signal: this.controller.signal,
        });
        if (response.status === 401) { signOut("The token was refused."); return; }
        if (!response.ok) throw new Error(await errorDetail(response));
        failures = 0;
        connection.show("live", "Live: changes appear as they happen.");
        await this.read(response.body);
        throw new Error("the stream ended");
      } catch (error) {
        if (this.stopped) return;
        failures += 1;
        connection.show("lost", `Live updates interrupted (${error.message}); reconnecting…`);
      }
      await delay(Math.min(250 * 2 ** (failures - 1), 8000));
    }
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        this.handle(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  }

  handle(block) {
    const data = block.split("\n").filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).trimStart()).join("\n");
    if (!data) return; // a keep-alive comment
    const record = JSON.parse(data);
    if (record.seq <= this.last) return;
    this.last = record.seq;
    this.onRecord(record);
  }
}

// -- pages ----------------------------------------------------------------------------

function signInPage() {
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off",
    required: true, "aria-describedby": "token-help" });
  const message = h("p", { id: "signin-message", class: "error", role: "alert" }, signInNotice);
  signInNotice = "";
  const form = h("form", { class: "signin", "aria-label": "Sign in" },
    h("label", { for: "token" }, "API token"), input,
    h("p", { id: "token-help", class: "muted" },
      "A token made by `medhive token create`. It is kept in this tab only and forgotten when the tab closes."),
    h("button", { type: "submit" }, "Sign in"), message);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    message.textContent = "";
    let response;
    try {
      response = await fetch("/v1/me", { headers: { Authorization: `Bearer ${token}` } });
    } catch {
      message.textContent = "medhive cannot be reached.";
      return;
    }
    if (response.ok) {
      session.save(token, await response.json());
      location.hash = "#/jobs";
    } else if (response.status === 403) {
      message.textContent = "This token cannot use the console (a node's token or a metrics token).";
    } else {
      message.textContent = "This token is unknown or revoked.";
    }
  });
  return { title: "Sign in", el: h("section", {}, h("h1", {}, "Sign in to medhive"), form),
    focus: input };
}

function jobsPage(params) {
  const operator = session.operator;
  const state = params.get("state") || "";
  const name = params.get("name") || "";
  const tenant = params.get("tenant") || "";
  const before = params.get("before") || "";
  const filters = h("form", { class: "filters", role: "search", "aria-label": "Filter jobs" },
    h("span", {}, h("label", { for: "filter-state" }, "State"),
      h("select", { id: "filter-state", name: "state" }, h("option", { value: "" }, "any"),
        STATES.map((s) => h("option", { value: s, selected: s === state }, s.replace("_", " "))))),
    h("span", {}, h("label", { for: "filter-name" }, "Name starts with"),
      h("input", { id: "filter-name", name: "name", value: name })),
    operator && h("span", {}, h("label", { for: "filter-tenant" }, "Tenant"),
      h("input", { id: "filter-tenant", name: "tenant", value: tenant,
        placeholder: "yours; * for every tenant" })),
    h("button", { type: "submit" }, "Show"));
  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const [key, value] of new FormData(filters)) if (value) query.set(key, value);
    location.hash = `#/jobs${query.size ? `?${query}` : ""}`;
  });
  const status = h("p", { class: "muted", role: "status" }, "Loading…");
  const rows = new Map();
  const body = h("tbody");
  const table = h("table", { "aria-label": "Jobs" }, h("thead", {}, h("tr", {},
    h("th", { scope: "col" }, "Job"), operator && h("th", { scope: "col" }, "Tenant"),
    h("th", { scope: "col" }, "State"), h("th", { scope: "col" }, "Node"),
    h("th", { scope: "col" }, "Created"), h("th", { scope: "col" }, "Updated"))), body);
  const pager = h("nav", { class: "pager", "aria-label": "Pages of jobs" });

  function row(job) {
    return h("tr", { "data-job": job.id },
      h("td", {}, h("a", { href: jobHref(job.id) }, job.name), h("div", { class: "mono muted" }, job.id)),
      operator && h("td", {}, job.tenant),
      h("td", {}, badge(job.state)), h("td", { class: "mono" }, job.node_id || "—"),
      h("td", {}, timeEl(job.created_at)), h("td", {}, timeEl(job.updated_at)));
  }

  function listQuery(extra = {}) {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    for (const [key, value] of Object.entries({ state, name, tenant, before, ...extra })) {
      if (value) query.set(key, value);
    }
    return query;
  }

  async function load() {
    const page = await getJson(`/v1/jobs?${listQuery()}`);
    rows.clear();
    put(body, ...page.jobs.map((job) => {
      const tr = row(job);
      rows.set(job.id, tr);
      return tr;
    }));
    status.textContent = page.jobs.length
      ? `${page.jobs.length} job${page.jobs.length === 1 ? "" : "s"} shown, newest first.`
      : "No jobs match.";
    const keep = new URLSearchParams(listQuery());
    keep.delete("limit");
    keep.delete("before");
    put(pager,
      before && h("a", { href: `#/jobs${keep.size ? `?${keep}` : ""}` }, "Newest"),
      page.next_before && h("a", { href: `#/jobs?${new URLSearchParams({ ...Object.fromEntries(keep), before: page.next_before })}` }, "Older"));
  }

  async function refresh(jobId) {
    try {
      const job = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`);
      const old = rows.get(jobId);
      if (!old) return;
      const fresh = row(job);
      rows.set(jobId, fresh);
      old.replaceWith(fresh);
    } catch (error) {
      if (!(error instanceof ApiFailure)) throw error;
    }
  }

  let reloading = null;
  function onRecord(record) {
    if (!record.job_id) return;
    if (rows.has(record.job_id)) refresh(record.job_id);
    else if (!before && !reloading) {
      // A job that is not shown: a new one belongs at the top of the first page.
      reloading = delay(300).then(load).finally(() => { reloading = null; });
    }
  }

  let stream = null;
  (async () => {
    try {
      // Where the audit ends now, then the page: what happens after it comes live.
      const head = await getJson("/v1/events/head");
      await load();
      const streamTenant = tenant === "*" ? "" : (tenant || session.me.tenant);
      stream = new LiveStream({ type: "job.", tenant: operator ? streamTenant : "" }, head.seq, onRecord);
    } catch (error) {
      status.textContent = `The jobs cannot be read: ${error.message}`;
      status.className = "error";
    }
  })();
  return {
    title: "Jobs",
    el: h("section", {}, h("h1", {}, "Jobs"), filters, status, table, pager),
    stop: () => stream?.stop(),
  };
}

function jobPage(jobId) {
  const heading = h("h1", {}, "Job ", h("span", { class: "mono" }, jobId));
  const facts = h("dl", { class: "facts", "aria-label": "The job" });
  const actions = h("div", { class: "actions", style: "justify-content:flex-start" });
  const interactive = h("div", { id: "interactive" });
  const progress = h("p", { id: "staging", class: "muted", role: "status" });
  const timeline = h("ol", { class: "timeline", "aria-label": "State timeline" });
  const spec = h("pre", { "aria-label": "Specification" });
  const logsBox = h("div", { id: "logs" });
  const outputsBox = h("div", { id: "outputs" });
  const auditBody = h("tbody");
  const error = h("p", { class: "error", role: "alert" });
  let job = null;
  let outputsShown = false;

  function renderJob() {
    put(heading, job.name, " ", badge(job.state));
    put(facts,
      h("dt", {}, "Id"), h("dd", { class: "mono" }, job.id),
      h("dt", {}, "Tenant"), h("dd", {}, job.tenant),
      h("dt", {}, "State"), h("dd", { id: "job-state" }, badge(job.state)),
      job.waiting_for && [h("dt", {}, "Waiting for"), h("dd", {}, job.waiting_for)],
      h("dt", {}, "Attempt"), h("dd", {}, String(job.attempt)),
      h("dt", {}, "Node"), h("dd", { class: "mono" }, job.node_id || "—"),
      h("dt", {}, "Image"), h("dd", { class: "mono" }, job.spec.image || job.spec.vm?.image || "—"),
      h("dt", {}, "Created"), h("dd", {}, timeEl(job.created_at)),
      h("dt", {}, "Updated"), h("dd", {}, timeEl(job.updated_at)));
    put(timeline, ...job.history.map((entry) => h("li", {},
      timeEl(entry.at), " ", entry.state ? badge(entry.state) : "", " ",
      entry.event ? h("span", { class: "mono" }, entry.event) : "",
      entry.reason ? h("span", { class: "muted" }, ` ${entry.reason}`) : "")));
    spec.textContent = JSON.stringify(job.spec, null, 2);
    const endpoints = Object.entries(job.interactive || {});
    put(interactive, endpoints.length ? h("section", {},
      h("h2", {}, "Connect to it"),
      h("ul", {}, endpoints.map(([kind, where]) => h("li", {}, `${kind}: `, h("span", { class: "mono" }, where))))) : "");
    const mine = job.tenant === session.me.tenant;
    put(actions,
      !ENDED.has(job.state) && mine && h("button", { type: "button", class: "danger", id: "cancel",
        onclick: cancel }, "Cancel job…"));
    if (job.state === "staging" && job.inputs_staged) progress.textContent = "Inputs staged.";
    if (ENDED.has(job.state)) {
      progress.textContent = "";
      if (!outputsShown) { outputsShown = true; showOutputs(); }
    }
  }

  async function load() {
    try {
      job = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`);
      error.textContent = "";
      renderJob();
    } catch (failure) {
      error.textContent = failure.status === 404
        ? "No such job, or it is another tenant's." : `The job cannot be read: ${failure.message}`;
    }
  }

  async function cancel() {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-title").textContent = "Cancel this job?";
    document.getElementById("confirm-text").textContent =
      `${job.name} (${job.id}) is stopped on its node; it cannot be resumed.`;
    document.getElementById("confirm-ok").textContent = "Cancel the job";
    dialog.returnValue = "";
    dialog.showModal();
    const answer = await new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue), { once: true });
    });
    if (answer !== "ok") return;
    try {
      await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ reason: `cancelled in the console by ${session.me.name}` }) });
      await load();
    } catch (failure) {
      error.textContent = `The job was not cancelled: ${failure.message}`;
    }
  }

  async function showLogs() {
    try {
      const logs = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}/logs`);
      put(logsBox,
        h("h3", {}, `stdout (attempt ${logs.attempt})${logs.stdout_truncated ? ", the last bytes" : ""}`),
        h("pre", { id: "stdout", tabindex: "0" }, logs.stdout || "(nothing)"),
        h("h3", {}, `stderr${logs.stderr_truncated ? ", the last bytes" : ""}`),
        h("pre", { id: "stderr", tabindex: "0" }, logs.stderr || "(nothing)"));
    } catch (failure) {
      put(logsBox, h("p", { class: "error" }, failure.status === 404
        ? "Logs are for the job's own tenant." : `The logs cannot be read: ${failure.message}`));
    }
  }

  async function download(file) {
    const name = file.path.split("/").pop();
    try {
      const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}/outputs/${file.path.split("/").map(encodeURIComponent).join("/")}`);
      const url = URL.createObjectURL(await response.blob());
      const link = h("a", { href: url, download: name, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (failure) {
      error.textContent = `${file.path} was not downloaded: ${failure.message}`;
    }
  }

  async function showOutputs() {
    try {
      const outputs = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}/outputs`);
      put(outputsBox, outputs.files.length ? h("table", { "aria-label": "Results" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "File"), h("th", { scope: "col" }, "Size"),
          h("th", { scope: "col" }, "SHA-256"), h("th", { scope: "col" }, h("span", { class: "muted" }, "Download")))),
        h("tbody", {}, outputs.files.map((file) => h("tr", {},
          h("td", { class: "mono" }, file.path), h("td", {}, megabytes(file.size)),
          h("td", { class: "mono" }, file.sha256.slice(0, 16) + "…"),
          h("td", {}, h("button", { type: "button", class: "secondary", onclick: () => download(file),
            "aria-label": `Download ${file.path}` }, "Download"))))))
        : h("p", { class: "muted" }, "It stored no results."));
    } catch (failure) {
      put(outputsBox, h("p", { class: "error" }, failure.status === 404
        ? "Results are for the job's own tenant." : `The results cannot be read: ${failure.message}`));
    }
  }

  function onRecord(record) {
    auditBody.append(h("tr", { "data-seq": record.seq },
      h("td", { class: "mono" }, String(record.seq)), h("td", {}, timeEl(record.occurred_at)),
      h("td", { class: "mono" }, record.type), h("td", { class: "mono" }, record.source || ""),
      h("td", {}, record.actor || "")));
    const payload = record.envelope?.payload || {};
    if (record.type === "data.progress") {
      progress.textContent = `Staging ${payload.input}: ${payload.files} files, ${megabytes(payload.bytes)} stored so far.`;
    }
    if (record.type?.startsWith("job.")) load();
  }

  load();
  const stream = new LiveStream({ job: jobId }, 0, onRecord);
  const el = h("section", {}, heading, error, actions, facts, progress, interactive,
    h("h2", {}, "Timeline"), timeline,
    h("h2", {}, "Logs"), h("button", { type: "button", class: "secondary", id: "show-logs", onclick: showLogs }, "Show logs"), logsBox,
    h("h2", {}, "Results"), outputsBox,
    h("h2", {}, "Specification"), spec,
    h("h2", {}, "Audit records"),
    h("table", { "aria-label": "Audit records of the job" }, h("thead", {}, h("tr", {},
      h("th", { scope: "col" }, "Seq"), h("th", { scope: "col" }, "When"), h("th", { scope: "col" }, "Type"),
      h("th", { scope: "col" }, "Source"), h("th", { scope: "col" }, "Actor"))), auditBody));
  return { title: `Job ${jobId}`, el, stop: () => stream.stop() };
}

function nodesPage() {
  const body = h("tbody");
  const status = h("p", { class: "muted", role: "status" }, "Loading…");
  async function load() {
    try {
      const { nodes } = await getJson("/v1/nodes");
      put(body, ...nodes.map((node) => h("tr", { "data-node": node.id },
        h("td", { class: "mono" }, node.id),
        h("td", {}, badge(node.online ? "online" : "offline")),
        h("td", {}, `${node.free_cpus} free of ${node.cpus}`),
        h("td", {}, `${node.free_memory_mb} MB free of ${node.memory_mb} MB`),
        h("td", {}, node.runtimes.join(", ")),
        h("td", {}, String(node.running_jobs), node.job_ids.length ? [": ",
          node.job_ids.map((id, i) => [i ? ", " : "", h("a", { href: jobHref(id), class: "mono" }, id)])] : ""),
        h("td", {}, timeEl(node.last_seen)))));
      status.textContent = `${nodes.length} node${nodes.length === 1 ? "" : "s"}; read at ${new Date().toLocaleTimeString()}, every ${NODES_REFRESH_MS / 1000} s.`;
    } catch (error) {
      status.textContent = `The nodes cannot be read: ${error.message}`;
    }
  }
  load();
  const timer = setInterval(load, NODES_REFRESH_MS);
  const table = h("table", { "aria-label": "Nodes" }, h("thead", {}, h("tr", {},
    ["Node", "Status", "CPUs", "Memory", "Runtimes", "Running jobs", "Last heartbeat"]
      .map((title) => h("th", { scope: "col" }, title)))), body);
  return { title: "Nodes", el: h("section", {}, h("h1", {}, "Nodes"), status, table),
    stop: () => clearInterval(timer) };
}

function auditPage(params) {
  const operator = session.operator;
  const job = params.get("job") || "";
  const type = params.get("type") || "";
  const tenant = params.get("tenant") || "";
  const filters = h("form", { class: "filters", role: "search", "aria-label": "Filter audit records" },
    h("span", {}, h("label", { for: "filter-job" }, "Job"), h("input", { id: "filter-job", name: "job", value: job })),
    h("span", {}, h("label", { for: "filter-type" }, "Type starts with"),
      h("input", { id: "filter-type", name: "type", value: type, placeholder: "e.g. job. or data." })),
    operator && h("span", {}, h("label", { for: "filter-tenant" }, "Tenant"),
      h("input", { id: "filter-tenant", name: "tenant", value: tenant })),
    h("button", { type: "submit" }, "Show"));
  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const [key, value] of new FormData(filters)) if (value) query.set(key, value);
    location.hash = `#/audit${query.size ? `?${query}` : ""}`;
  });
  const chain = h("p", { id: "chain", role: "status" });
  async function verifyChain() {
    chain.textContent = "Verifying the hash chain…";
    chain.className = "muted";
    try {
      const verdict = await getJson("/v1/audit/verify");
      chain.className = verdict.ok ? "" : "error";
      chain.textContent = verdict.ok
        ? `Chain verified: ${verdict.records} records intact, up to seq ${verdict.last_seq}.`
        : `Chain broken at seq ${verdict.first_bad_seq}: ${verdict.problem}`;
    } catch (failure) {
      chain.className = "error";
      chain.textContent = `The chain was not verified: ${failure.message}`;
    }
  }
  const body = h("tbody");
  function onRecord(record) {
    body.prepend(row(record));
    while (body.childElementCount > AUDIT_ROWS_KEPT) body.lastElementChild.remove();
  }
  // The page shows what came after `from`, live; "Earlier records" moves `from` back.
  const back = Math.min(Math.max(1, Number(params.get("back")) || AUDIT_BACK), AUDIT_BACK);
  const chosen = Object.fromEntries(Object.entries({ job, type, tenant }).filter(([, v]) => v));
  let from = 0;
  const earlier = h("button", { type: "button", class: "secondary", hidden: true,
    onclick: showEarlier }, "Earlier records");
  function row(record) {
    const payload = record.envelope?.payload || {};
    const summary = payload.state ? `${payload.previous_state || ""} → ${payload.state}` :
      payload.reason || payload.input || "";
    return h("tr", { "data-seq": record.seq },
      h("td", { class: "mono" }, String(record.seq)), h("td", {}, timeEl(record.occurred_at)),
      h("td", { class: "mono" }, record.type || ""), h("td", {}, record.tenant || "—"),
      h("td", { class: "mono" }, record.job_id ? h("a", { href: jobHref(record.job_id) }, record.job_id) : "—"),
      h("td", {}, record.actor || ""), h("td", {}, summary));
  }
  async function showEarlier() {
    const start = Math.max(0, from - back);
    try {
      const query = new URLSearchParams({ ...chosen, after: String(start), limit: String(back) });
      const { events } = await getJson(`/v1/events?${query}`);
      body.append(...events.filter((record) => record.seq <= from).reverse().map(row));
      from = start;
      earlier.hidden = from === 0;
    } catch (failure) {
      chain.textContent = `Earlier records cannot be read: ${failure.message}`;
    }
  }
  let stream = null;
  (async () => {
    try {
      // A job's records from its start (they are indexed); otherwise the recent ones.
      const head = job ? { seq: 0 } : await getJson("/v1/events/head");
      from = Math.max(0, head.seq - back);
      earlier.hidden = from === 0;
      stream = new LiveStream(chosen, from, onRecord);
    } catch (failure) {
      chain.textContent = `The audit cannot be read: ${failure.message}`;
    }
  })();
  if (operator) verifyChain();
  else chain.textContent = "Verifying the chain is for operators.";
  const table = h("table", { "aria-label": "Audit records, newest first" }, h("thead", {}, h("tr", {},
    ["Seq", "When", "Type", "Tenant", "Job", "Actor", "What"].map((title) => h("th", { scope: "col" }, title)))), body);
  return {
    title: "Audit",
    el: h("section", {}, h("h1", {}, "Audit trail"), filters,
      h("div", { class: "actions", style: "justify-content:flex-start" }, chain,
        operator && h("button", { type: "button", class: "secondary", onclick: verifyChain }, "Verify again")),
      table, h("div", { class: "pager" }, earlier)),
    stop: () => stream?.stop(),
  };
}

function tenantsPage() {
  const body = h("tbody");
  const status = h("p", { class: "muted", role: "status" }, "Loading…");
  (async () => {
    try {
      const { tenants, half_life_s: halfLife } = await getJson("/v1/tenants");
      put(body, ...tenants.map((t) => h("tr", {},
        h("td", {}, t.tenant), h("td", {}, String(t.share)), h("td", {}, t.load.toFixed(3)),
        h("td", {}, t.usage_cpu_s.toFixed(0)), h("td", {}, `${t.running_jobs} (${t.running_cpus} cpus, ${t.running_memory_mb} MB)`),
        h("td", {}, String(t.queued_jobs)),
        h("td", { class: "mono" }, Object.entries(t.quota).filter(([, v]) => v !== null).map(([k, v]) => `${k}=${v}`).join(" ") || "none"))));
      status.textContent = `${tenants.length} tenants; usage decays with a half-life of ${halfLife / 3600} h.`;
    } catch (failure) {
      status.textContent = failure.status === 403 ? "Tenants are for operators."
        : `The tenants cannot be read: ${failure.message}`;
    }
  })();
  const table = h("table", { "aria-label": "Tenants" }, h("thead", {}, h("tr", {},
    ["Tenant", "Share", "Load", "Usage (cpu s)", "Running", "Queued", "Quota"].map((title) => h("th", { scope: "col" }, title)))), body);
  return { title: "Tenants", el: h("section", {}, h("h1", {}, "Tenants"), status, table) };
}

// -- routing ----------------------------------------------------------------------------

let shown = null;

function route() {
  shown?.stop?.();
  connection.clear(); // the next page's own streams say how they are
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const me = session.me;
  document.getElementById("nav").hidden = !me;
  document.getElementById("sign-out").hidden = !me;
  document.getElementById("nav-tenants").hidden = !session.operator;
  document.getElementById("who").textContent = me ? `${me.name} · tenant ${me.tenant} · ${me.role}` : "";
  if (!me) {
    connection.clear();
    shown = signInPage();
  } else if (parts[0] === "jobs" && parts[1]) shown = jobPage(parts[1]);
  else if (parts[0] === "nodes") shown = nodesPage();
  else if (parts[0] === "audit") shown = auditPage(params);
  else if (parts[0] === "tenants" && session.operator) shown = tenantsPage();
  else if (parts[0] === "jobs") shown = jobsPage(params);
  else { location.replace("#/jobs"); return; }
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.page === parts[0]) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${shown.title} · medhive`;
  const main = document.getElementById("main");
  put(main, shown.el);
  (shown.focus || main).focus();
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
  route();
});
