// housekeeping dashboard: a client of the REST API, no build step.
//
// Data flow: fetch() streams /api/v1/task-events (EventSource cannot send an
// Authorization header); once the stream is open the page (re)reads the first
// page of /api/v1/tasks and merges both by meta.version, so nothing is missed
// between the two. Tasks beyond the first page are counted (X-Total-Count,
// or "more" from the Link header), not loaded. Changes only mark rows dirty; one animation frame renders them.
// Clicking a row (or Enter on it) follows that task's log in the panel below
// the table, over the same fetch-based stream reader.
// Every string from the server is written with textContent, never as HTML.
"use strict";
(() => {
  const API = "/api/v1";
  const TOKEN_KEY = "housekeeping.token";
  const STATES = ["NEW", "ACTIVE", "WAITING", "CANCELED", "FAILED", "SUCCEEDED"];
  const TERMINAL = new Set(["CANCELED", "FAILED", "SUCCEEDED"]);
  const RETRY_MS = [500, 1000, 2000, 3000];
  const FRAME_BUDGET_MS = 12;
  const MAX_EVENT_CHARS = 4 * 1024 * 1024; // one SSE message; a task or a 16 KiB log line is far less
  const LOG_KEEP = 5000; // log lines the panel keeps in the page, newest
  const LOG_FRAME_LINES = 500; // log lines added per animation frame
  const TASK_PAGE = 1000; // tasks the page loads: the first page of the list

  const $ = (id) => document.getElementById(id);
  const rows = $("task-rows");
  const entries = new Map(); // task id -> {task, row, cells}
  const dirty = new Set();
  const operationsSeen = new Set();
  let framePending = false;
  let generation = 0; // bumps on every (re)connect; stale loops stop
  let controller = null;
  let retries = 0;
  let notLoaded = 0; // tasks on the server beyond the first page (-1: some, count unknown)

  // -- auth -----------------------------------------------------------------------
  const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
  function headers(extra) {
    const result = Object.assign({}, extra);
    const value = token();
    if (value) result.Authorization = "Bearer " + value;
    return result;
  }

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function request(method, path, body) {
    const init = { method, headers: headers({ Accept: "application/json" }), cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    if (!response.ok) {
      const message = data && typeof data.message === "string" ? data.message : response.statusText;
      throw new ApiError(response.status, message);
    }
    return { data, response };
  }
  async function api(method, path, body) { return (await request(method, path, body)).data; }

  // -- banner and connection state --------------------------------------------------
  function setConnection(state, text) {
    const badge = $("connection");
    badge.dataset.state = state;
    badge.textContent = text;
    document.body.dataset.connection = state;
  }
  function showBanner(text) { const b = $("banner"); b.textContent = text; b.hidden = false; }
  function hideBanner() { const b = $("banner"); b.textContent = ""; b.hidden = true; }
  function authProblem(status, message) {
    const what = status === 401 ? "401 Unauthorized" : "403 Forbidden";
    const hint = status === 401 ? " Enter a bearer token above." : "";
    showBanner(what + ": " + message + "." + hint);
    setConnection("unauthorized", String(status));
  }

  // -- the task table -----------------------------------------------------------------
  function upsert(task) {
    if (!task || !task.meta || typeof task.meta.id !== "string") return;
    const id = task.meta.id;
    const known = entries.get(id);
    if (known && known.task && known.task.meta.version >= task.meta.version) return;
    if (known) known.task = task; else entries.set(id, { task, row: null, cells: null });
    markDirty(id);
  }
  function remove(id) {
    const entry = entries.get(id);
    if (!entry) return;
    if (entry.row) entry.row.remove();
    entries.delete(id);
    dirty.delete(id);
    scheduleFrame();
  }
  function markDirty(id) { dirty.add(id); scheduleFrame(); }
  function scheduleFrame() {
    if (framePending) return;
    framePending = true;
    requestAnimationFrame(render);
  }

  function cell(row, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    row.appendChild(td);
    return td;
  }
  function buildRow(id) {
    const row = document.createElement("tr");
    row.dataset.id = id;
    row.tabIndex = 0; // Enter opens the task's log
    if (id === logView.id) row.classList.add("selected");
    const cells = {};
    cells.id = cell(row, "id");
    cells.id.textContent = id;
    cells.operation = cell(row, "operation");
    cells.object = cell(row, "object");
    const stateCell = cell(row, "state-cell");
    cells.state = document.createElement("span");
    stateCell.appendChild(cells.state);
    const progressCell = cell(row, "");
    const wrap = document.createElement("div");
    wrap.className = "progress";
    const bar = document.createElement("div");
    bar.className = "bar";
    cells.fill = document.createElement("div");
    cells.fill.className = "fill";
    bar.appendChild(cells.fill);
    cells.pct = document.createElement("span");
    cells.pct.className = "pct";
    wrap.append(bar, cells.pct);
    progressCell.appendChild(wrap);
    cells.age = cell(row, "age");
    cells.message = cell(row, "message");
    const actions = cell(row, "actions");
    cells.cancel = document.createElement("button");
    cells.cancel.type = "button";
    cells.cancel.className = "cancel";
    cells.cancel.textContent = "Cancel";
    cells.cancel.dataset.id = id;
    actions.appendChild(cells.cancel);
    return { row, cells };
  }
  function placeRow(entry) {
    // Creation order: new tasks go last; an older one (from a re-read) goes before the first newer.
    const created = entry.task.meta.timeCreated || "";
    const last = rows.lastElementChild;
    if (!last || (entries.get(last.dataset.id) || { task: { meta: {} } }).task.meta.timeCreated <= created) {
      rows.appendChild(entry.row);
      return;
    }
    for (const other of rows.children) {
      const otherEntry = entries.get(other.dataset.id);
      if (otherEntry && otherEntry.task.meta.timeCreated > created) {
        rows.insertBefore(entry.row, other);
        return;
      }
    }
    rows.appendChild(entry.row);
  }

  function percentOf(task) {
    const value = Number(task.progress && task.progress.percentComplete);
    return Number.isFinite(value) ? Math.max(0, Math.min(100, Math.round(value))) : 0;
  }
  function lastMessage(task) {
    const messages = Array.isArray(task.messages) ? task.messages : [];
    const last = messages[messages.length - 1];
    return last && typeof last.message === "string" ? last.message : "";
  }
  function age(task, now) {
    const created = Date.parse(task.meta.timeCreated);
    if (!Number.isFinite(created)) return "";
    let s = Math.max(0, Math.floor((now - created) / 1000));
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60); s %= 60;
    if (m < 60) return m + "m" + String(s).padStart(2, "0") + "s";
    const h = Math.floor(m / 60);
    if (h < 48) return h + "h" + String(m % 60).padStart(2, "0") + "m";
    return Math.floor(h / 24) + "d";
  }
  function setText(node, text) { if (node.textContent !== text) node.textContent = text; }

  function paint(entry, now) {
    const task = entry.task;
    if (!entry.row) {
      Object.assign(entry, buildRow(task.meta.id));
      placeRow(entry);
    }
    const cells = entry.cells;
    const state = STATES.includes(task.state) ? task.state : "UNKNOWN";
    entry.row.dataset.state = state;
    setText(cells.operation, String(task.operation));
    setText(cells.object, task.objectId == null ? "" : String(task.objectId));
    setText(cells.state, task.cancelRequested && !TERMINAL.has(state) ? state + " (canceling)" : state);
    cells.state.className = "state state-" + state;
    const pct = percentOf(task);
    cells.fill.style.width = pct + "%";
    setText(cells.pct, pct + "%");
    setText(cells.age, age(task, now));
    const message = lastMessage(task);
    setText(cells.message, message);
    cells.message.title = message;
    cells.cancel.hidden = TERMINAL.has(state);
    cells.cancel.disabled = Boolean(task.cancelRequested);
    entry.row.hidden = !matches(task);
    const operation = String(task.operation);
    if (!operationsSeen.has(operation)) addOperationFilter(operation);
  }

  function render() {
    // Paint for at most FRAME_BUDGET_MS, then yield to the browser and go on next
    // frame: a thousand new rows arrive in a few frames instead of one long freeze.
    framePending = false;
    const now = Date.now();
    const deadline = performance.now() + FRAME_BUDGET_MS;
    for (const id of dirty) {
      const entry = entries.get(id);
      if (entry) paint(entry, now);
      dirty.delete(id);
      if (performance.now() > deadline) break;
    }
    updateCounts();
    if (dirty.size) scheduleFrame();
  }

  function matches(task) {
    const operation = $("filter-operation").value;
    const state = $("filter-state").value;
    if (operation && task.operation !== operation) return false;
    if (state === "UNFINISHED") return !TERMINAL.has(task.state);
    return !state || task.state === state;
  }
  function applyFilters() {
    for (const entry of entries.values()) if (entry.row) entry.row.hidden = !matches(entry.task);
    updateCounts();
  }
  function updateCounts() {
    let shown = 0;
    for (const entry of entries.values()) if (entry.row && !entry.row.hidden) shown += 1;
    setText($("counts"), entries.size + " tasks, " + shown + " shown");
    $("empty").hidden = shown > 0;
    const more = $("not-loaded");
    more.hidden = notLoaded === 0;
    setText(more, notLoaded === 0 ? "" : (notLoaded > 0 ? notLoaded + " more" : "more")
      + " on the server, not loaded: the page shows the first " + TASK_PAGE
      + " tasks and every change since");
  }
  function addOperationFilter(operation) {
    operationsSeen.add(operation);
    const select = $("filter-operation");
    const option = document.createElement("option");
    option.value = operation;
    option.textContent = operation;
    select.appendChild(option);
  }
  function tickAges() {
    const now = Date.now();
    for (const entry of entries.values()) {
      if (entry.row && !entry.row.hidden) setText(entry.cells.age, age(entry.task, now));
    }
  }

  // -- server-sent events over fetch ---------------------------------------------------
  // One reader for both streams (the task events and a task's log): EventSource
  // cannot send an Authorization header, so the page reads the body itself.
  function parseEvent(block) {
    const message = { event: "message", id: null, data: null };
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue; // keep-alive and other comments
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") message.event = value;
      else if (field === "data") data.push(value);
      else if (field === "id") message.id = value;
    }
    if (data.length) message.data = data.join("\n");
    return message;
  }

  // Call onMessage with each message of the stream until it ends, breaks,
  // isCurrent() turns false or onMessage returns false (then the read is
  // canceled). A message larger than MAX_EVENT_CHARS ends the read too.
  async function readEvents(response, isCurrent, onMessage) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let carriage = ""; // a chunk's last "\r" may be the start of "\r\n"
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || !isCurrent()) break;
        let text = carriage + decoder.decode(value, { stream: true });
        carriage = text.endsWith("\r") ? "\r" : "";
        if (carriage) text = text.slice(0, -1);
        buffer += text.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          if (!onMessage(parseEvent(block)) || !isCurrent()) {
            reader.cancel().catch(() => {});
            return;
          }
        }
        if (buffer.length > MAX_EVENT_CHARS) break;
      }
    } catch (_) { return; /* the connection broke */ }
    reader.cancel().catch(() => {});
  }

  // -- the task event stream ---------------------------------------------------------------
  function handleMessage(message, seen) {
    if (message.data === null) return true;
    if (message.event === "DROPPED") return false; // fell behind: reconnect and re-read
    let payload;
    try { payload = JSON.parse(message.data); } catch (_) { return true; }
    const task = payload && payload.task;
    if (!task || !task.meta) return true;
    seen.add(task.meta.id);
    if (message.event === "DELETE") remove(task.meta.id); else upsert(task);
    return true;
  }

  async function reread(gen, seen) {
    const { data: tasks, response } = await request("GET", API + "/tasks?limit=" + TASK_PAGE);
    if (gen !== generation || !Array.isArray(tasks)) return;
    const total = Number.parseInt(response.headers.get("X-Total-Count") || "", 10);
    const hasNext = /rel="next"/.test(response.headers.get("Link") || "");
    notLoaded = Number.isFinite(total) ? Math.max(0, total - tasks.length) : (hasNext ? -1 : 0);
    const listed = new Set();
    for (const task of tasks) { listed.add(task.meta.id); upsert(task); }
    // Tasks purged while the page was not listening are gone from the list.
    for (const id of Array.from(entries.keys())) {
      if (!listed.has(id) && !seen.has(id)) remove(id);
    }
  }

  async function connect() {
    const gen = ++generation;
    if (controller) controller.abort();
    controller = new AbortController();
    const signal = controller.signal;
    setConnection("connecting", "connecting…");
    let response;
    try {
      response = await fetch(API + "/task-events", {
        headers: headers({ Accept: "text/event-stream" }), cache: "no-store", signal,
      });
    } catch (error) {
      if (gen === generation) retry(gen, "cannot reach the server");
      return;
    }
    if (gen !== generation) return;
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).message || message; } catch (_) { /* not JSON */ }
      if (response.status === 401 || response.status === 403) {
        authProblem(response.status, message); // wait for a token; retrying cannot help
        return;
      }
      retry(gen, response.status + ": " + message);
      return;
    }
    hideBanner();
    setConnection("live", "live");
    retries = 0;
    const seen = new Set();
    reread(gen, seen).then(loadOperations).catch((error) => {
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        authProblem(error.status, error.message);
      }
    });
    await readEvents(response, () => gen === generation, (message) => handleMessage(message, seen));
    if (gen === generation) retry(gen, "the event stream ended");
  }

  function retry(gen, why) {
    const delay = RETRY_MS[Math.min(retries, RETRY_MS.length - 1)];
    retries += 1;
    setConnection("error", "reconnecting (" + why + ")");
    setTimeout(() => { if (gen === generation) connect(); }, delay);
  }

  // -- the log panel ------------------------------------------------------------------------
  // Follows GET /tasks/{id}/log?follow=true&after=N with readEvents(). Every line
  // carries its seq, so a stream that ends without "end" (the server drops a
  // slow reader) is resumed from the last seq seen, and a gap in the seqs is
  // counted as lines the server dropped. Lines are queued and added a batch per
  // frame; the page keeps only the newest LOG_KEEP of them.
  const logView = {
    id: null, gen: 0, controller: null, retries: 0,
    after: 0, // the newest seq shown (or queued)
    missing: 0, // lines the seqs skipped: dropped by the server before the page saw them
    reported: 0, // "dropped" as the server last reported it
    trimmed: 0, // older lines this page removed to stay within LOG_KEEP
    pending: [], framePending: false,
  };
  const UNPRINTABLE = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}]/gu;

  function printable(text) {
    // Like the CLI: control and format characters become "?" (a tab stays a tab).
    return String(text).replace(UNPRINTABLE, (ch) => (ch === "\t" ? ch : "?"));
  }
  function clock(time) {
    const ms = Date.parse(time);
    if (!Number.isFinite(ms)) return "";
    const d = new Date(ms);
    const two = (n) => String(n).padStart(2, "0");
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds()) + "."
      + String(d.getMilliseconds()).padStart(3, "0");
  }

  function setLogStatus(state, text) {
    const badge = $("log-status");
    badge.dataset.state = state;
    badge.textContent = text;
    $("log-panel").dataset.state = state;
  }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }
  function updateLogNote() {
    const parts = [];
    const dropped = Math.max(logView.missing, logView.reported);
    if (dropped > 0) {
      parts.push(plural(dropped, "line") + " dropped by the server, which keeps only the newest output");
    }
    if (logView.trimmed > 0) {
      parts.push("showing the newest " + LOG_KEEP + " lines (" + logView.trimmed + " older removed from the page)");
    }
    const note = $("log-note");
    setText(note, parts.join("; "));
    note.hidden = parts.length === 0;
    $("log-panel").dataset.dropped = String(dropped);
    const complete = $("log-panel").dataset.state === "complete";
    setText($("log-empty"), logView.after > 0 ? "" : complete ? "No output." : "No output yet.");
  }

  function openLog(id) {
    if (logView.id === id && !$("log-panel").hidden) return;
    closeLog();
    logView.id = id;
    const entry = entries.get(id);
    if (entry && entry.row) entry.row.classList.add("selected");
    setText($("log-task"), id);
    setText($("log-operation"), entry ? String(entry.task.operation) : "");
    $("log-panel").hidden = false;
    document.body.classList.add("log-open");
    followLog(logView.gen);
    updateLogNote();
  }

  function closeLog() {
    logView.gen += 1; // a stale read or retry stops at its next step
    if (logView.controller) logView.controller.abort();
    const entry = logView.id === null ? null : entries.get(logView.id);
    if (entry && entry.row) entry.row.classList.remove("selected");
    Object.assign(logView, {
      id: null, controller: null, retries: 0, after: 0, missing: 0, reported: 0, trimmed: 0,
      pending: [],
    });
    $("log-lines").replaceChildren();
    $("log-panel").hidden = true;
    document.body.classList.remove("log-open");
  }

  function restartLog() {
    // A new token: resume the open log with it from where it stopped.
    if (logView.id === null) return;
    logView.gen += 1;
    if (logView.controller) logView.controller.abort();
    logView.retries = 0;
    followLog(logView.gen);
  }

  async function followLog(gen) {
    const id = logView.id;
    const controller = new AbortController();
    logView.controller = controller;
    setLogStatus("connecting", "connecting…");
    const url = API + "/tasks/" + encodeURIComponent(id) + "/log?follow=true&after=" + logView.after;
    let response;
    try {
      response = await fetch(url, {
        headers: headers({ Accept: "text/event-stream" }), cache: "no-store", signal: controller.signal,
      });
    } catch (_) {
      if (gen === logView.gen) retryLog(gen, "cannot reach the server");
      return;
    }
    if (gen !== logView.gen) { controller.abort(); return; }
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).message || message; } catch (_) { /* not JSON */ }
      if (gen !== logView.gen) return;
      if ([401, 403, 404].includes(response.status)) {
        // No retry can help: the task is gone, or a token is needed (restartLog() then).
        setLogStatus("error", response.status + ": " + message);
        return;
      }
      retryLog(gen, response.status + ": " + message);
      return;
    }
    setLogStatus("live", "following");
    let ended = false;
    await readEvents(response, () => gen === logView.gen, (message) => {
      if (message.event === "line") return addLogLine(message.data);
      if (message.event === "end") { ended = true; endLog(message.data); return false; }
      return true;
    });
    if (gen === logView.gen && !ended) retryLog(gen, "the stream ended");
  }

  function retryLog(gen, why) {
    const delay = RETRY_MS[Math.min(logView.retries, RETRY_MS.length - 1)];
    logView.retries += 1;
    setLogStatus("error", "reconnecting (" + why + ")");
    setTimeout(() => { if (gen === logView.gen) followLog(gen); }, delay);
  }

  function addLogLine(data) {
    let line;
    try { line = JSON.parse(data); } catch (_) { return true; }
    if (!line || !Number.isSafeInteger(line.seq) || line.seq <= logView.after) return true; // a resent line
    logView.missing += line.seq - logView.after - 1;
    logView.after = line.seq;
    logView.retries = 0;
    logView.pending.push(line);
    if (logView.pending.length > LOG_KEEP) {
      const excess = logView.pending.length - LOG_KEEP;
      logView.pending.splice(0, excess);
      logView.trimmed += excess;
    }
    scheduleLogFrame();
    return true;
  }

  function endLog(data) {
    let end = null;
    try { end = JSON.parse(data); } catch (_) { end = null; }
    if (end && Number.isSafeInteger(end.dropped)) logView.reported = Math.max(logView.reported, end.dropped);
    if (end && Number.isSafeInteger(end.next) && end.next > logView.after) {
      logView.missing += end.next - logView.after;
      logView.after = end.next;
    }
    setLogStatus("complete", "complete");
    updateLogNote();
  }

  function scheduleLogFrame() {
    if (logView.framePending) return;
    logView.framePending = true;
    requestAnimationFrame(renderLog);
  }
  function buildLogLine(line) {
    const stream = line.stream === "stderr" ? "stderr" : "stdout";
    const row = document.createElement("div");
    row.className = "log-line " + stream;
    row.dataset.seq = String(line.seq);
    row.dataset.stream = stream;
    const time = document.createElement("time");
    if (typeof line.time === "string") {
      time.dateTime = line.time;
      time.title = line.time;
      time.textContent = clock(line.time);
    }
    const label = document.createElement("span");
    label.className = "log-stream";
    label.textContent = stream;
    const text = document.createElement("span");
    text.className = "log-text";
    text.textContent = printable(line.text == null ? "" : line.text);
    row.append(time, label, text);
    return row;
  }
  function renderLog() {
    logView.framePending = false;
    const box = $("log-lines");
    const follow = box.scrollHeight - box.scrollTop - box.clientHeight < 24; // at the bottom: stay there
    const fragment = document.createDocumentFragment();
    for (const line of logView.pending.splice(0, LOG_FRAME_LINES)) fragment.appendChild(buildLogLine(line));
    box.appendChild(fragment);
    for (let excess = box.childElementCount - LOG_KEEP; excess > 0; excess -= 1) {
      box.firstElementChild.remove();
      logView.trimmed += 1;
    }
    if (follow) box.scrollTop = box.scrollHeight;
    updateLogNote();
    if (logView.pending.length) scheduleLogFrame();
  }

  // -- actions ----------------------------------------------------------------------------
  async function loadOperations() {
    const select = $("create-operation");
    let operations = [];
    try { operations = await api("GET", API + "/operations"); } catch (_) { operations = []; }
    select.replaceChildren();
    for (const entry of Array.isArray(operations) ? operations : []) {
      const operation = entry && typeof entry === "object" ? entry.operation : entry;
      const option = document.createElement("option");
      option.value = String(operation);
      option.textContent = String(operation);
      select.appendChild(option);
      if (!operationsSeen.has(String(operation))) addOperationFilter(String(operation));
    }
    $("create-submit").disabled = select.options.length === 0;
  }

  function setStatus(text, isError) {
    const status = $("create-status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  async function createTask(event) {
    event.preventDefault();
    const body = { operation: $("create-operation").value };
    const objectId = $("create-object-id").value.trim();
    if (objectId) body.objectId = objectId;
    const argsText = $("create-args").value.trim();
    if (argsText) {
      try { body.args = JSON.parse(argsText); } catch (error) {
        setStatus("args is not valid JSON: " + error.message, true);
        return;
      }
    }
    try {
      const task = await api("POST", API + "/tasks", body);
      setStatus("created " + task.meta.id, false);
      upsert(task);
    } catch (error) {
      setStatus((error.status ? error.status + ": " : "") + error.message, true);
    }
  }

  async function cancelTask(id, button) {
    button.disabled = true;
    try {
      upsert(await api("POST", API + "/tasks/" + encodeURIComponent(id) + "/cancel"));
    } catch (error) {
      button.disabled = false;
      showBanner("cancel " + id + ": " + (error.status ? error.status + ": " : "") + error.message);
    }
  }

  // -- wiring -----------------------------------------------------------------------------
  function start() {
    $("token").value = "";
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
      $("token").value = "";
      hideBanner();
      connect();
      restartLog();
    });
    $("token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      connect();
      restartLog();
    });
    $("create-form").addEventListener("submit", createTask);
    $("filter-operation").addEventListener("change", applyFilters);
    $("filter-state").addEventListener("change", applyFilters);
    rows.addEventListener("click", (event) => {
      const button = event.target.closest("button.cancel");
      if (button && button.dataset.id) { cancelTask(button.dataset.id, button); return; }
      const row = event.target.closest("tr[data-id]");
      if (row && !String(window.getSelection())) openLog(row.dataset.id); // not when selecting text
    });
    rows.addEventListener("keydown", (event) => {
      if ((event.key === "Enter" || event.key === " ") && event.target.matches("tr[data-id]")) {
        event.preventDefault();
        openLog(event.target.dataset.id);
      }
    });
    $("log-close").addEventListener("click", () => {
      const id = logView.id;
      closeLog();
      const entry = id === null ? null : entries.get(id);
      if (entry && entry.row) entry.row.focus();
    });
    $("log-panel").addEventListener("keydown", (event) => {
      if (event.key === "Escape") $("log-close").click();
    });
    setInterval(tickAges, 1000);
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
