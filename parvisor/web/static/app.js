// The parvisor web console: one page shell, drawn by the URL, fed by the JSON API
// (/v1, the same routes the CLI uses) and by a Server-Sent Events stream.
//
// Rules kept here: every piece of data reaches the DOM through textContent or an
// attribute (never innerHTML), so a VM's notes show as text; every change carries the
// CSRF token; what a viewer may not do is hidden, and the server refuses it anyway.
"use strict";

const state = {role: "", csrf: "", vms: [], vmsAt: 0, page: null, host: "", cluster: null,
               myJobs: {}};

// --- small helpers -------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function cookie(name) {
  const found = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
  return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
}

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code;
    this.details = error.details || {};
  }
}

async function api(method, path, body) {
  const headers = {"x-csrf-token": state.csrf || cookie("parvisor_csrf")};
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, {method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body)});
  if (response.status === 401) toLogin();
  const answer = response.status === 204 ? {} : await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, answer.error || {});
  return answer;
}

function toLogin() {
  location.assign("/ui/login?next=" + encodeURIComponent(location.pathname));
}

function toast(message, bad) {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.className = bad ? "show bad" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.className = ""; }, 4000);
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${Number.isInteger(n) ? n : n.toFixed(1)} ${units[i]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), hh = Math.floor(s / 3600) % 24;
  const mm = Math.floor(s / 60) % 60, ss = s % 60;
  return (d ? `${d}d ` : "") + (d || hh ? `${hh}h ` : "") + `${mm}m ${ss}s`;
}

function when(timestamp) {
  return new Date(timestamp * 1000).toLocaleString();
}

function badge(value) {
  return h("span", {class: `badge s-${value}`, "data-state": value}, value);
}

function liveUptime(vm) {
  if (vm.uptime_s === null || vm.uptime_s === undefined) return null;
  return vm.uptime_s + (performance.now() - state.vmsAt) / 1000;
}

// --- start-up --------------------------------------------------------------------------
async function boot() {
  const session = await api("GET", "/ui/api/session");
  Object.assign(state, {role: session.role, csrf: session.csrf, host: session.host,
                        cluster: session.cluster});
  document.body.dataset.role = session.role;
  document.getElementById("who").textContent = `${session.user} (${session.role})`;
  document.getElementById("logout").addEventListener("click", async () => {
    await api("POST", "/ui/api/logout").catch(() => {});
    location.assign("/ui/login");
  });
  state.page = route(location.pathname);
  document.querySelectorAll("nav a").forEach((a) =>
    a.classList.toggle("current", a.dataset.page === state.page.name));
  const main = document.getElementById("main");
  main.replaceChildren(state.page.render());
  listen();
  setInterval(() => state.page.tick && state.page.tick(), 1000);
}

function route(path) {
  const vm = path.match(/^\/ui\/vms\/([^/]+)$/);
  if (vm) return vmPage(decodeURIComponent(vm[1]));
  if (path === "/ui/create") return createPage();
  if (path === "/ui/jobs") return jobsPage();
  if (path === "/ui/events") return eventsPage();
  if (path === "/ui/cluster") return clusterPage();
  if (path === "/ui/switches") return switchesPage();
  if (path === "/ui/disks") return disksPage();
  return listPage();
}

function listen() {
  const live = document.getElementById("live");
  const stream = new EventSource("/ui/api/stream");
  stream.addEventListener("open", () => live.classList.add("on"));
  stream.addEventListener("vms", (e) => {
    state.vms = JSON.parse(e.data);
    state.vmsAt = performance.now();
    if (state.page.onVms) state.page.onVms(state.vms);
  });
  stream.addEventListener("events", (e) => {
    if (state.page.onEvents) state.page.onEvents(JSON.parse(e.data));
  });
  stream.addEventListener("jobs", (e) => {
    if (state.page.onJobs) state.page.onJobs(JSON.parse(e.data));
  });
  stream.addEventListener("error", async () => {
    live.classList.remove("on");
    // EventSource retries by itself; an expired session must go to the login page
    const probe = await fetch("/ui/api/session", {credentials: "same-origin"})
      .catch(() => null);
    if (probe && probe.status === 401) toLogin();
  });
}

// --- VM list -------------------------------------------------------------------------
const COLUMNS = [
  ["name", "Name"], ["state", "State"], ["host", "Host"], ["vcpus", "vCPUs"],
  ["memory_bytes", "Memory"], ["uptime_s", "Uptime"], ["heartbeat", "Heartbeat"],
  ["ha", "HA"]];

function listPage() {
  const view = {sort: "name", descending: false, filter: "", stateFilter: ""};
  const body = h("tbody", {id: "vm-rows"});
  const count = h("span", {class: "muted", id: "vm-count"});
  const header = h("tr", {}, COLUMNS.map(([key, label]) => h("th", {
    "data-sort": key, tabindex: 0,
    onclick: () => {
      view.descending = view.sort === key ? !view.descending : false;
      view.sort = key;
      draw();
    }}, label)));
  function draw() {
    const wanted = state.vms.filter((vm) =>
      vm.name.toLowerCase().includes(view.filter.toLowerCase()) &&
      (!view.stateFilter || vm.state === view.stateFilter));
    wanted.sort((a, b) => {
      const x = a[view.sort] ?? -1, y = b[view.sort] ?? -1;
      const order = x < y ? -1 : x > y ? 1 : 0;
      return view.descending ? -order : order;
    });
    body.replaceChildren(...wanted.map(vmRow));
    count.textContent = `${wanted.length} of ${state.vms.length} VMs`;
    header.querySelectorAll("th").forEach((th) => th.className =
      th.dataset.sort === view.sort ? (view.descending ? "sorted desc" : "sorted") : "");
  }
  const states = ["", "running", "off", "paused", "saved", "starting", "stopping",
                  "saving", "crashed"];
  return {
    name: "vms",
    render: () => h("section", {},
      h("div", {class: "bar"}, h("h1", {}, "Virtual machines"), count,
        h("input", {type: "search", id: "vm-filter", placeholder: "Filter by name",
                    oninput: (e) => { view.filter = e.target.value; draw(); }}),
        h("select", {id: "state-filter", onchange: (e) => {
          view.stateFilter = e.target.value; draw(); }},
          states.map((s) => h("option", {value: s}, s || "any state"))),
        h("a", {href: "/ui/create", class: "button", "data-admin": true}, "New VM")),
      h("table", {class: "grid"}, h("thead", {}, header), body)),
    onVms: draw,
    tick: () => document.querySelectorAll("#vm-rows td.uptime").forEach((td) => {
      const vm = state.vms.find((v) => v.name === td.parentNode.dataset.vm);
      if (vm) td.textContent = duration(liveUptime(vm));
    }),
  };
}

function vmRow(vm) {
  return h("tr", {"data-vm": vm.name},
    h("td", {}, h("a", {href: `/ui/vms/${encodeURIComponent(vm.name)}`}, vm.name)),
    h("td", {class: "state"}, badge(vm.state)),
    h("td", {class: "host"}, vm.host || "–"),
    h("td", {class: "num"}, vm.vcpus),
    h("td", {class: "num"}, bytes(vm.memory_current_bytes ?? vm.memory_bytes)),
    h("td", {class: "num uptime"}, duration(liveUptime(vm))),
    h("td", {}, badge(vm.heartbeat)),
    h("td", {class: "ha"}, vm.ha ? "HA" : ""));
}

// --- one VM --------------------------------------------------------------------------
// action -> [label, states it applies in, API path suffix]
const ACTIONS = [
  ["start", "Start", ["off", "saved", "crashed"]],
  ["shutdown", "Shut down", ["running"]],
  ["turn-off", "Turn off", ["running", "paused", "starting", "stopping"]],
  ["pause", "Pause", ["running"]],
  ["resume", "Resume", ["paused"]],
  ["restart", "Restart", ["running"]],
  ["save", "Save", ["running", "paused"]]];

function vmPage(name) {
  const base = `/v1/vms/${encodeURIComponent(name)}`;
  const parts = {title: h("h1", {}, name), state: h("span", {id: "vm-state"}),
    actions: h("div", {class: "actions", "data-admin": true}),
    details: h("dl", {class: "details"}), devices: h("div", {}),
    hotadd: h("form", {class: "inline", "data-admin": true, novalidate: true}),
    events: h("tbody", {id: "vm-events"}), console: consolePanel(name),
    checkpoints: checkpointsPanel(name, base), deviceForms: deviceForms(base),
    charts: chartsPanel(base), migration: state.cluster ? migrationPanel(name, base) : null};
  let revision = null, current = null;
  async function refresh() {
    try {
      current = await api("GET", base);
    } catch (error) {
      parts.details.replaceChildren(h("p", {class: "error"}, error.message));
      return;
    }
    revision = current.revision + ":" + current.state + ":" + current.heartbeat;
    parts.state.replaceChildren(badge(current.state));
    drawActions(parts.actions, current, base);
    drawDetails(parts.details, current);
    drawDevices(parts.devices, current);
    drawHotAdd(parts.hotadd, current, base);
    parts.console.update(current.state);
    parts.checkpoints.refresh();
    if (parts.migration) parts.migration.refresh(current);
  }
  async function loadEvents() {
    const events = await api("GET", `/v1/events?vm=${encodeURIComponent(name)}&limit=50`);
    parts.events.replaceChildren(...events.reverse().map(eventRow));
  }
  return {
    name: "vm",
    render() {
      refresh();
      loadEvents();
      parts.deviceForms.loadSwitches();
      parts.charts.start();
      return h("section", {},
        h("div", {class: "bar"}, h("a", {href: "/ui/"}, "← all VMs"), parts.title, parts.state,
          h("a", {href: `/ui/vms/${encodeURIComponent(name)}/display`, id: "display-link",
                  class: "button", "data-admin": true}, "Display")),
        parts.actions,
        h("div", {class: "columns"},
          h("div", {class: "card"}, h("h2", {}, "Definition"), parts.details),
          h("div", {class: "card"}, h("h2", {}, "Devices"), parts.devices,
            h("h2", {"data-admin": true}, "Change vCPUs / memory"), parts.hotadd,
            parts.deviceForms.node)),
        h("div", {class: "card"}, h("h2", {}, "Performance"), parts.charts.node),
        h("div", {class: "card"}, h("h2", {}, "Checkpoints"), parts.checkpoints.node),
        parts.migration && h("div", {class: "card"}, h("h2", {}, "Migration"),
                             parts.migration.node),
        h("div", {class: "card"}, h("h2", {}, "Serial console"), parts.console.node),
        h("div", {class: "card"}, h("h2", {}, "Events"),
          h("table", {class: "grid"}, parts.events)));
    },
    onVms(vms) {
      const vm = vms.find((v) => v.name === name);
      if (vm && revision !== vm.revision + ":" + vm.state + ":" + vm.heartbeat) refresh();
    },
    onEvents(events) {
      const mine = events.filter((e) => e.vm_name === name);
      parts.events.prepend(...mine.reverse().map(eventRow));
      if (mine.some((e) => e.kind === "checkpoint")) parts.checkpoints.refresh();
    },
    onJobs: reportMyJobs,
  };
}

function drawActions(box, vm, base) {
  const buttons = ACTIONS.map(([action, label, states]) => h("button", {
    type: "button", "data-action": action, disabled: !states.includes(vm.state),
    onclick: () => act(base, action, label)}, label));
  const confirmBox = h("span", {class: "confirm", hidden: true},
    `Delete ${vm.name} and its own disks? `,
    h("button", {type: "button", class: "danger", "data-action": "confirm-delete",
      onclick: async () => {
        try {
          await api("DELETE", base);
          location.assign("/ui/");
        } catch (error) { toast(error.message, true); }
      }}, "Delete for good"),
    h("button", {type: "button", onclick: () => { confirmBox.hidden = true; }}, "Cancel"));
  const remove = h("button", {type: "button", class: "danger", "data-action": "delete",
    disabled: !["off", "saved", "crashed"].includes(vm.state),
    onclick: () => { confirmBox.hidden = false; }}, "Delete…");
  box.replaceChildren(...buttons, remove, confirmBox);
}

async function act(base, action, label) {
  try {
    const answer = await api("POST", `${base}/${action}`);
    toast(answer.job ? `${label}: job ${answer.job.id} started` : `${label}: done`);
  } catch (error) {
    toast(`${label} refused: ${error.message}`, true);
  }
}

function drawDetails(dl, vm) {
  const rows = [
    ["State", vm.state + (vm.state_reason ? ` (${vm.state_reason})` : "")],
    ["vCPUs", `${vm.vcpus} (max ${vm.max_vcpus})`],
    ["Memory", `${bytes(vm.memory_bytes)} (max ${bytes(vm.max_memory_bytes)})`],
    ["Memory now", bytes(vm.memory_current_bytes)],
    ["Uptime", duration(vm.uptime_s)], ["Heartbeat", vm.heartbeat],
    ["IP addresses", vm.ip_addresses.join(", ") || "–"],
    ["Generation", `${vm.generation} (${vm.os_type})`],
    ["Boot", vm.boot.kind === "kernel" ? `kernel ${vm.boot.kernel}` : "disk"],
    ["High availability", vm.ha ? `yes (${vm.ha_priority})` : "no"],
    ["Automatic actions", `start: ${vm.auto_start_action}, stop: ${vm.auto_stop_action}`],
    ["Host", vm.host], ["UUID", vm.uuid], ["Notes", vm.notes || "–"]];
  dl.replaceChildren(...rows.flatMap(([key, value]) =>
    [h("dt", {}, key), h("dd", {"data-field": key.toLowerCase()}, value)]));
}

function drawDevices(box, vm) {
  const disks = vm.disks.map((d) => h("li", {},
    `${d.id}: ${d.media} on ${d.bus}, ${d.path || "empty"} ${d.size_bytes ? bytes(d.size_bytes) : ""}`));
  const nics = vm.nics.map((n) => h("li", {},
    `${n.id}: ${n.model} on switch ${n.switch}${n.vlan ? ` vlan ${n.vlan}` : ""}, ${n.mac}`));
  box.replaceChildren(
    h("h3", {}, `Processors: ${vm.vcpus} vCPU${vm.vcpus === 1 ? "" : "s"}`),
    h("h3", {}, "Disks"), disks.length ? h("ul", {}, disks) : h("p", {class: "muted"}, "none"),
    h("h3", {}, "Network adapters"),
    nics.length ? h("ul", {}, nics) : h("p", {class: "muted"}, "none"));
}

function drawHotAdd(form, vm, base) {
  const vcpus = field("vcpus", "vCPUs", {type: "number", min: 1, value: vm.vcpus});
  const memory = field("memory", "Memory", {value: bytes(vm.memory_bytes).replace(" ", "")
    .replace("iB", "")});
  form.replaceChildren(vcpus.label, memory.label,
    h("button", {type: "submit", "data-action": "apply-size"}, "Apply"));
  form.onsubmit = async (event) => {
    event.preventDefault();
    clearErrors(form);
    try {
      await api("PATCH", base, {vcpus: Number(vcpus.input.value), memory: memory.input.value});
      toast("changed");
    } catch (error) { showErrors(form, error); }
  };
}

// A job this page started failed: say why (its success shows as an event and a refresh).
function reportMyJobs(jobs) {
  for (const job of jobs) {
    const label = state.myJobs[job.id];
    if (!label || !["failed", "succeeded", "cancelled"].includes(job.status)) continue;
    delete state.myJobs[job.id];
    if (job.status !== "succeeded") {
      toast(`${label} ${job.status}: ${(job.error && job.error.message) || job.message}`, true);
    }
  }
}

// --- the serial console ----------------------------------------------------------------
function consolePanel(name) {
  const node = h("div", {class: "console"});
  let socket = null, term = null;
  function open() {
    if (!window.Terminal) {
      node.replaceChildren(h("p", {class: "error"},
        "xterm.js is missing: run ./setup.sh install (npm ci in web/)"));
      return;
    }
    term = new window.Terminal({rows: 24, cols: 100, convertEol: false, cursorBlink: true});
    const screen = h("div", {class: "terminal-box", id: "terminal"});
    node.replaceChildren(screen);
    term.open(screen);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(`${scheme}//${location.host}/v1/vms/${encodeURIComponent(name)}/console`);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => { screen.dataset.connected = "yes"; term.focus(); };
    socket.onmessage = (e) => term.write(typeof e.data === "string" ? e.data : new Uint8Array(e.data));
    socket.onclose = (e) => {
      screen.dataset.connected = "no";
      term.write(`\r\n[console closed${e.reason ? ": " + e.reason : ""}]\r\n`);
    };
    term.onData((data) => socket && socket.readyState === 1 && socket.send(new TextEncoder().encode(data)));
  }
  function close() {
    if (socket) socket.close();
    if (term) term.dispose();
    socket = term = null;
  }
  return {
    node,
    update(vmState) {
      const usable = ["running", "paused"].includes(vmState);
      if (state.role !== "administrator") {
        node.replaceChildren(h("p", {class: "muted"}, "The console needs the administrator role."));
      } else if (usable && !socket) {
        open();
      } else if (!usable) {
        close();
        node.replaceChildren(h("p", {class: "muted"}, `The VM is ${vmState}: no console.`));
      }
    },
  };
}

// --- create form -------------------------------------------------------------------------
function field(name, label, attrs) {
  const input = h("input", {name, id: `f-${name}`, ...attrs});
  const error = h("span", {class: "field-error", id: `e-${name}`, role: "alert"});
  return {input, label: h("label", {for: `f-${name}`}, h("span", {}, label), input, error)};
}

// API field names (request or definition) -> the form's field
// (sizes name themselves in words: parvisor.model.sizes.parse_size(what=...))
const FIELD_ALIASES = {memory_bytes: "memory", max_memory_bytes: "memory", "disk size": "size"};

function clearErrors(form) {
  form.querySelectorAll(".field-error, .form-error").forEach((e) => { e.textContent = ""; });
}

function showErrors(form, error) {
  const errors = error.details.errors || [{field: error.details.field || "", message: error.message}];
  for (const item of errors) {
    const name = FIELD_ALIASES[item.field] || item.field.split(".")[0];
    const slot = form.querySelector(`#e-${CSS.escape(name)}`) || form.querySelector(".form-error");
    if (slot) slot.textContent = item.message.replace(/^Value error, /, "");
  }
}

function createPage() {
  const fields = [field("name", "Name", {required: true, maxlength: 63}),
    field("vcpus", "vCPUs", {type: "number", min: 1, max: 64, value: 1}),
    field("memory", "Memory", {value: "256M", placeholder: "256M, 1G"}),
    field("switch", "Network switch (optional)", {placeholder: "switch name"})];
  const notes = h("textarea", {name: "notes", id: "f-notes", rows: 3, maxlength: 4096});
  const start = h("input", {type: "checkbox", name: "start", id: "f-start"});
  const form = h("form", {class: "card form", id: "create-form", novalidate: true},
    h("p", {class: "muted"}, "Boots the tiny guest image (kernel + initrd)."),
    fields.map((f) => f.label),
    h("label", {for: "f-notes"}, h("span", {}, "Notes"), notes,
      h("span", {class: "field-error", id: "e-notes"})),
    h("label", {class: "check"}, start, "Start it after creating"),
    h("p", {class: "form-error error", role: "alert"}),
    h("button", {type: "submit"}, "Create"));
  form.addEventListener("submit", (event) => submitCreate(event, form, fields, notes, start));
  return {name: "create",
          render: () => h("section", {}, h("h1", {}, "New virtual machine"), form)};
}

async function submitCreate(event, form, fields, notes, start) {
  event.preventDefault();
  clearErrors(form);
  const value = Object.fromEntries(fields.map((f) => [f.input.name, f.input.value.trim()]));
  const body = {name: value.name, vcpus: Number(value.vcpus), memory: value.memory,
                image: "tiny", notes: notes.value};
  if (value.switch) body.nics = [{switch: value.switch}];
  try {
    await api("POST", "/v1/vms", body);
    if (start.checked) await api("POST", `/v1/vms/${encodeURIComponent(body.name)}/start`);
    location.assign(`/ui/vms/${encodeURIComponent(body.name)}`);
  } catch (error) { showErrors(form, error); }
}

// --- jobs and events -----------------------------------------------------------------------
function jobsPage() {
  const body = h("tbody", {id: "job-rows"});
  return {
    name: "jobs",
    render: () => h("section", {}, h("h1", {}, "Jobs"), h("table", {class: "grid"},
      h("thead", {}, h("tr", {}, ["Job", "Kind", "VM", "Status", "Progress", "Message",
                                  "Started"].map((t) => h("th", {}, t)))), body)),
    onJobs: (jobs) => body.replaceChildren(...jobs.reverse().map((job) => h("tr", {},
      h("td", {}, job.id), h("td", {}, job.kind), h("td", {}, job.vm || "–"),
      h("td", {}, badge(job.status)),
      h("td", {}, h("progress", {max: 1, value: job.progress}),
        ` ${Math.round(job.progress * 100)}%`),
      h("td", {}, job.message), h("td", {}, when(job.started_at))))),
  };
}

function eventRow(event) {
  return h("tr", {}, h("td", {class: "nowrap"}, when(event.timestamp)),
    h("td", {}, badge(event.kind)), h("td", {}, event.vm_name || "host"),
    h("td", {}, event.message));
}

function eventsPage() {
  const body = h("tbody", {id: "event-rows"});
  let filter = "";
  const matches = (e) => !filter || (e.vm_name || "host").includes(filter);
  return {
    name: "events",
    render() {
      const load = () => api("GET", "/v1/events?limit=500").then((events) =>
        body.replaceChildren(...events.reverse().filter(matches).map(eventRow)));
      load();
      return h("section", {}, h("div", {class: "bar"}, h("h1", {}, "Event log"),
        h("input", {type: "search", placeholder: "Filter by VM (or host)",
                    onchange: (e) => { filter = e.target.value; load(); }})),
        h("table", {class: "grid"}, body));
    },
    onEvents: (events) => body.prepend(...events.filter(matches).reverse().map(eventRow)),
  };
}

// --- forms shared by the pages below -------------------------------------------------------
// A form with a slot for errors that name no field; `fields` are field() results.
function actionForm(id, fields, button, extra) {
  return h("form", {class: "inline", id, "data-admin": true, novalidate: true},
    fields.map((f) => f.label), extra || null,
    h("button", {type: "submit", "data-action": id}, button),
    h("p", {class: "form-error error", role: "alert"}));
}

// Run `call` for a form: errors go next to their field (or under the form); nothing
// else happens on an error, so a refused value changes nothing on the page either.
// `renamed`: API field -> this form's field; `about`: where an error that names no
// field goes when its details name `about[0]` (e.g. {path} of a refused disk path).
function submitWith(form, call, renamed = {}, about = ["path", "path"]) {
  form.onsubmit = async (event) => {
    event.preventDefault();
    clearErrors(form);
    try {
      await call();
    } catch (error) {
      const details = error.details;
      if (!details.errors && !details.field && details[about[0]] !== undefined &&
          form.querySelector(`#e-${about[1]}`)) details.field = about[1];
      for (const item of details.errors || []) item.field = renamed[item.field] || item.field;
      showErrors(form, error);
    }
  };
}

// An inline "are you sure" next to a button; `run` is called on confirmation.
function confirmButton(label, question, action, run) {
  const box = h("span", {class: "confirm", hidden: true});
  const ask = h("button", {type: "button", class: "danger", "data-action": action,
    onclick: () => { box.hidden = false; }}, label + "…");
  box.append(question + " ",
    h("button", {type: "button", class: "danger", "data-action": `confirm-${action}`,
      onclick: async () => { box.hidden = true; await run(); }}, label),
    h("button", {type: "button", onclick: () => { box.hidden = true; }}, "Cancel"));
  return h("span", {class: "confirmable"}, ask, box);
}

// A job answered 202: say so; the page refreshes when its event or job update arrives.
function jobStarted(label, answer) {
  toast(answer.job ? `${label}: job ${answer.job.id} started` : `${label}: done`);
  if (answer.job) state.myJobs[answer.job.id] = label;
}

// --- one VM: checkpoints ----------------------------------------------------------------
function checkpointsPanel(name, base) {
  const tree = h("div", {id: "checkpoint-tree"});
  const nameField = field("checkpoint", "Name (optional)", {maxlength: 63,
                                                            placeholder: "ckpt-…"});
  const memory = h("input", {type: "checkbox", id: "f-with-memory"});
  const form = actionForm("create-checkpoint", [nameField], "Create checkpoint",
    h("label", {class: "check"}, memory, "with memory (running VM)"));
  submitWith(form, async () => {
    const body = {with_memory: memory.checked};
    if (nameField.input.value.trim()) body.name = nameField.input.value.trim();
    jobStarted("Checkpoint", await api("POST", `${base}/checkpoints`, body));
    nameField.input.value = "";
  }, {name: "checkpoint"}, ["checkpoint", "checkpoint"]);   // e.g. the name is taken
  async function refresh() {
    let answer;
    try {
      answer = await api("GET", `${base}/checkpoints`);
    } catch (error) {
      tree.replaceChildren(h("p", {class: "error"}, error.message));
      return;
    }
    const items = answer.checkpoints;
    if (!items.length) {
      tree.replaceChildren(h("p", {class: "muted"}, "No checkpoints."));
      return;
    }
    const byId = Object.fromEntries(items.map((c) => [c.id, c]));
    const roots = items.filter((c) => !c.parent || !byId[c.parent]);
    tree.replaceChildren(h("ul", {class: "tree"}, roots.map((c) => node(c))));
    function node(c) {
      const kids = items.filter((k) => k.parent === c.id);
      return h("li", {"data-checkpoint": c.name},
        h("span", {class: "cp-name"}, c.name), " ",
        h("span", {class: "muted"}, when(c.created)),
        c.with_memory ? h("span", {class: "badge"}, "memory") : null,
        c.phase !== "ready" ? badge(c.phase) : null,
        c.current ? h("span", {class: "badge s-running", "data-current": true}, "now") : null,
        h("span", {class: "cp-actions", "data-admin": true},
          confirmButton("Apply", `Return ${name} to '${c.name}'? What changed since is lost` +
            (c.with_memory ? "." : "; a running VM is turned off."), "apply-checkpoint",
            async () => {
              try {
                jobStarted("Apply", await api("POST",
                  `${base}/checkpoints/${encodeURIComponent(c.id)}/apply`));
              } catch (error) { toast(`Apply refused: ${error.message}`, true); }
            }),
          confirmButton("Delete", `Delete checkpoint '${c.name}'? (the VM's present state ` +
            "stays)", "delete-checkpoint", async () => {
            try {
              jobStarted("Delete checkpoint", await api("DELETE",
                `${base}/checkpoints/${encodeURIComponent(c.id)}`));
            } catch (error) { toast(`Delete refused: ${error.message}`, true); }
          })),
        kids.length ? h("ul", {}, kids.map(node)) : null);
    }
  }
  return {node: h("div", {}, tree, form), refresh};
}

// --- one VM: hot-add of a network adapter and a disk ---------------------------------------
function deviceForms(base) {
  const picker = h("select", {name: "switch", id: "f-switch"});
  const switchLabel = h("label", {for: "f-switch"}, h("span", {}, "Switch"), picker,
    h("span", {class: "field-error", id: "e-switch", role: "alert"}));
  const vlan = field("vlan", "VLAN (optional)", {type: "number", min: 1, max: 4094});
  const nicForm = actionForm("add-nic", [vlan], "Add network adapter", null);
  nicForm.prepend(switchLabel);
  submitWith(nicForm, async () => {
    const body = {switch: picker.value};
    if (vlan.input.value.trim()) body.vlan = Number(vlan.input.value);
    const answer = await api("POST", `${base}/nics`, body);
    toast(`network adapter ${answer.nic.id} added`);
  });
  const size = field("size", "Size", {placeholder: "1G, 512M", value: "1G"});
  const diskForm = actionForm("add-disk", [size], "Add disk", null);
  submitWith(diskForm, async () => {
    const answer = await api("POST", `${base}/disks`, {size: size.input.value.trim()});
    toast(`disk ${answer.disk ? answer.disk.id : ""} added`);
  });
  async function loadSwitches() {
    const switches = await api("GET", "/v1/switches").catch(() => []);
    const chosen = picker.value;
    picker.replaceChildren(...(switches.length ? switches.map((s) => h("option",
      {value: s.definition.name}, `${s.definition.name} (${s.definition.type})`))
      : [h("option", {value: ""}, "no switch: create one on the Switches page")]));
    if (chosen) picker.value = chosen;
  }
  return {node: h("div", {"data-admin": true}, h("h3", {}, "Add a network adapter"), nicForm,
                  h("h3", {}, "Add a disk (new, empty)"), diskForm), loadSwitches};
}

// --- one VM: live charts (uPlot) ----------------------------------------------------------
const STATS_EVERY_MS = 3000;
const CHART_POINTS = 60;          // three minutes at one sample per 3 s
const CHARTS = [
  // id, title, series labels, unit, figures of (previous, now, seconds between)
  ["cpu", "CPU", ["CPU %"], "%", (a, b, dt) =>
    [a && b.cpu_seconds !== null && a.cpu_seconds !== null
      ? rate(a.cpu_seconds, b.cpu_seconds, dt) * 100 : null]],
  ["memory", "Memory", ["guest MiB", "QEMU resident MiB"], "MiB", (a, b) =>
    [mib(b.memory_actual_bytes), mib(b.qemu_rss_bytes)]],
  ["disk", "Disk", ["read KiB/s", "write KiB/s"], "KiB/s", (a, b, dt) =>
    [kib(rate(sum(a, "disks", "read_bytes"), sum(b, "disks", "read_bytes"), dt)),
     kib(rate(sum(a, "disks", "written_bytes"), sum(b, "disks", "written_bytes"), dt))]],
  ["network", "Network", ["received KiB/s", "sent KiB/s"], "KiB/s", (a, b, dt) =>
    [kib(rate(sum(a, "nics", "receive_bytes"), sum(b, "nics", "receive_bytes"), dt)),
     kib(rate(sum(a, "nics", "transmit_bytes"), sum(b, "nics", "transmit_bytes"), dt))]],
];

function sum(sample, list, key) {
  if (!sample) return null;
  return sample[list].reduce((total, item) => total + (item[key] || 0), 0);
}

// per second; null when a counter is missing or went back (QEMU restarted, disk removed)
function rate(before, after, seconds) {
  if (before === null || after === null || before === undefined || after === undefined ||
      after < before || seconds <= 0) return null;
  return (after - before) / seconds;
}

function mib(n) { return n === null || n === undefined ? null : n / 1048576; }
function kib(n) { return n === null ? null : n / 1024; }

function chartsPanel(base) {
  const node = h("div", {class: "charts", id: "charts"});
  const note = h("p", {class: "muted", id: "charts-note"});
  const charts = {};
  let previous = null, timer = null;
  function build() {
    if (!window.uPlot) {
      node.replaceChildren(h("p", {class: "error"},
        "uPlot is missing: run ./setup.sh install (npm ci in web/)"));
      return false;
    }
    for (const [id, title, labels, unit] of CHARTS) {
      const box = h("div", {class: "chart", id: `chart-${id}`, "data-samples": 0});
      const now = h("span", {class: "muted chart-now"});
      node.append(h("div", {}, h("h3", {}, title, " ", now), box));
      const data = [[], ...labels.map(() => [])];
      const plot = new window.uPlot({
        width: 380, height: 150, legend: {show: true, live: false},
        scales: {x: {time: true}, y: {range: (u, min, max) => [0, Math.max(max || 0, 1)]}},
        axes: [{}, {size: 50, label: unit}],
        series: [{}, ...labels.map((label, i) => ({label, stroke: ["#2557c7", "#c75b25"][i],
                                                     width: 1.5, spanGaps: false}))],
      }, data, box);
      charts[id] = {box, now, plot, data, labels};
    }
    return true;
  }
  async function sample() {
    let now;
    try {
      now = await api("GET", `${base}/stats`);
    } catch (error) {
      note.textContent = error.message;
      return;
    }
    note.textContent = now.running ? "" : `The VM is ${now.state}: no figures while it ` +
      "does not run (or it runs on another host).";
    if (!now.running) { previous = null; return; }
    const dt = previous ? now.at - previous.at : 0;
    for (const [id, , , unit, figures] of CHARTS) {
      const chart = charts[id];
      const values = figures(previous, now, dt);
      chart.data[0].push(now.at);
      values.forEach((v, i) => chart.data[i + 1].push(v));
      if (chart.data[0].length > CHART_POINTS) chart.data.forEach((s) => s.shift());
      chart.plot.setData(chart.data);
      chart.box.dataset.samples = String(chart.data[0].length);
      chart.now.textContent = values.map((v, i) => v === null ? "" :
        `${chart.labels[i]}: ${v.toFixed(1)}`).filter(Boolean).join(", ") || `(${unit})`;
    }
    previous = now;
  }
  return {
    node: h("div", {}, note, node),
    start() {
      if (timer || !build()) return;
      sample();
      timer = setInterval(sample, STATS_EVERY_MS);
    },
  };
}

// --- one VM: migration (cluster members only) ----------------------------------------------
const MIGRATION_CANCELLABLE = ["requested", "preparing", "prepared", "performing"];
const MIGRATION_DONE = ["completed", "failed", "cancelled"];

function migrationPanel(name, base) {
  const picker = h("select", {name: "to", id: "f-to"});
  const toLabel = h("label", {for: "f-to"}, h("span", {}, "To host"), picker,
    h("span", {class: "field-error", id: "e-to", role: "alert"}));
  const quick = h("input", {type: "checkbox", id: "f-quick"});
  const storage = h("input", {type: "checkbox", id: "f-with-storage"});
  const form = actionForm("migrate", [], "Migrate",
    [h("label", {class: "check"}, quick, "quick (save, move, restore)"),
     h("label", {class: "check"}, storage, "with storage (copy the disks)")]);
  form.prepend(toLabel);
  const progress = h("div", {id: "migration"});
  let timer = null;
  submitWith(form, async () => {
    await api("POST", `${base}/migrate`, {to: picker.value, quick: quick.checked,
                                          with_storage: storage.checked});
    toast(`migration of ${name} to ${picker.value} requested`);
    watch();
  });
  async function loadHosts(vmHost) {
    let status;
    try {
      status = await api("GET", "/v1/cluster");
    } catch (error) { return; }
    const hosts = status.hosts.filter((x) => x.name !== vmHost && x.health === "up");
    picker.replaceChildren(...(hosts.length ? hosts.map((x) => h("option", {value: x.name},
      `${x.name}${x.site ? ` (site ${x.site})` : ""}`))
      : [h("option", {value: ""}, "no other host is up")]));
  }
  async function show() {
    let m;
    try {
      m = await api("GET", `${base}/migration`);
    } catch (error) {
      if (error.status === 404) progress.replaceChildren(h("p", {class: "muted"},
        "No migration on record."));
      stop();
      return;
    }
    const p = m.progress || {};
    const total = (p.ram_total || 0) + (p.disk_total || 0);
    const left = (p.ram_remaining || 0) + (p.disk_remaining || 0);
    const done = MIGRATION_DONE.includes(m.phase);
    const share = m.phase === "completed" ? 1 : total ? (total - left) / total : 0;
    progress.replaceChildren(h("div", {}, h("p", {},
      `${m.source} → ${m.destination}: `, badge(m.phase), " ",
      h("progress", {max: 1, value: share, id: "migration-progress"}),
      ` ${Math.round(share * 100)}%`,
      p.status && !done ? h("span", {class: "muted"}, ` ${p.status}, pass ${p.passes}, ` +
        `${bytes(p.ram_remaining)} RAM left`) : null,
      m.reason ? h("span", {class: "error"}, ` ${m.reason}`) : null,
      m.result && m.result.downtime_ms !== undefined ? h("span", {class: "muted"},
        ` downtime ${m.result.downtime_ms} ms, ${m.result.total_time_ms} ms in all`) : null),
      MIGRATION_CANCELLABLE.includes(m.phase) && !m.cancel_requested ? h("button", {
        type: "button", class: "danger", "data-admin": true, "data-action": "cancel-migration",
        onclick: async () => {
          try {
            await api("POST", `${base}/migration/cancel`);
            toast("cancel requested");
          } catch (error) { toast(`Cancel refused: ${error.message}`, true); }
        }}, "Cancel migration") : null));
    if (done) stop(); else watch();
  }
  function watch() { if (!timer) timer = setInterval(show, 2000); }
  function stop() { clearInterval(timer); timer = null; }
  return {
    node: h("div", {}, progress, form),
    refresh(vm) { loadHosts(vm.host); show(); },
  };
}

// --- cluster -------------------------------------------------------------------------------
function clusterPage() {
  const body = h("div", {id: "cluster"});
  async function load() {
    if (!state.cluster) {
      body.replaceChildren(h("div", {class: "card", id: "standalone"},
        h("p", {}, `This host (${state.host}) is standalone: it is not a cluster member.`),
        h("p", {class: "muted"}, "A cluster starts with parvisor cluster create " +
          "(docs/cluster.md); this page then shows its hosts, quorum and manager.")));
      return;
    }
    let status;
    try {
      status = await api("GET", "/v1/cluster");
    } catch (error) {
      body.replaceChildren(h("p", {class: "error"}, error.message));
      return;
    }
    body.replaceChildren(clusterSummary(status), clusterHosts(status, load));
  }
  return {
    name: "cluster",
    render() {
      load();
      setInterval(load, 3000);          // lease ages move every second
      return h("section", {}, h("h1", {}, "Cluster"), body);
    },
  };
}

function clusterSummary(status) {
  const voters = status.etcd.filter((m) => m.voter);
  // witness: true = a member on no host (quorum only), null = the hosts published no
  // address, so the status cannot tell (parvisor/cluster/status.py mark_witnesses)
  const unknown = status.etcd.some((m) => m.witness === null);
  const witnesses = status.etcd.filter((m) => m.witness);
  const rows = [
    ["Cluster", status.cluster],
    ["Quorum", status.quorum ? "yes" : `NO${status.error ? ": " + status.error : ""}`],
    ["Manager", status.manager || "none"],
    ["Voting members", `${voters.filter((m) => m.reachable).length} of ${voters.length} ` +
      `reachable: ${voters.map((m) => m.name + (m.leader ? " (leader)" : "") +
        (m.reachable ? "" : " (unreachable)")).join(", ") || "–"}`],
    ["Witness", unknown ? "not known (a host published no address)"
      : witnesses.map((m) => `${m.name}: ${m.reachable ? "reachable" : "unreachable"}` +
        (m.voter ? "" : " (learner)")).join(", ") || "none"],
    ["This host", status.this_host ? status.this_host.name : state.host]];
  return h("div", {class: "card"}, h("dl", {class: "details", id: "cluster-summary"},
    rows.flatMap(([key, value]) => [h("dt", {}, key),
      h("dd", {"data-field": key.toLowerCase()}, value)])));
}

const HEALTH_LOOK = {up: "ok", maintenance: "paused", down: "lost"};   // badge colours

function clusterHosts(status, reload) {
  const vmsOn = (host) => status.vms.filter((vm) => vm.host === host).length;
  const rows = status.hosts.map((x) => h("tr", {"data-host": x.name},
    h("td", {}, x.name, " ", x.manager ? h("span", {class: "badge"}, "manager") : null),
    h("td", {}, h("span", {class: `badge s-${HEALTH_LOOK[x.health] || "lost"}`,
                           "data-health": x.health}, x.health)),
    h("td", {class: "num"}, x.lease_age_s === null ? "–" : `${x.lease_age_s} s of ${x.lease_ttl_s} s`),
    h("td", {}, x.site || "–"),
    h("td", {class: "num"}, vmsOn(x.name)),
    h("td", {class: "num"}, x.cpus ?? "–"), h("td", {class: "num"}, bytes(x.memory_bytes)),
    h("td", {"data-admin": true}, x.health === "maintenance"
      ? h("button", {type: "button", "data-action": "resume-host", onclick: () =>
          hostAction(x.name, "resume", reload)}, "Resume")
      : confirmButton("Drain", `Drain ${x.name}? Its VMs move to other hosts.`,
          "drain-host", () => hostAction(x.name, "drain", reload)))));
  return h("table", {class: "grid"}, h("thead", {}, h("tr", {},
    ["Host", "Health", "Lease age", "Site", "VMs", "CPUs", "Memory", ""].map((t) =>
      h("th", {}, t)))), h("tbody", {id: "host-rows"}, rows));
}

async function hostAction(host, action, reload) {
  try {
    const answer = await api("POST", `/v1/cluster/hosts/${encodeURIComponent(host)}/${action}`);
    toast(`${host}: ${answer.note || action}`);
    reload();
  } catch (error) { toast(`${action} refused: ${error.message}`, true); }
}

// --- switches ------------------------------------------------------------------------------
const SWITCH_TYPES = {private: [], internal: ["host_address"], nat: ["subnet"],
                      external: ["uplink"]};

function switchesPage() {
  const body = h("tbody", {id: "switch-rows"});
  const name = field("name", "Name", {maxlength: 32, placeholder: "letters, digits, - _"});
  const type = h("select", {name: "type", id: "f-type"},
    Object.keys(SWITCH_TYPES).map((t) => h("option", {value: t}, t)));
  const extra = {host_address: field("host_address", "Host address", {placeholder: "10.20.30.1/24"}),
                 subnet: field("subnet", "Subnet (optional)", {placeholder: "10.213.7.0/24"}),
                 uplink: field("uplink", "Uplink interface", {placeholder: "eth0"})};
  const notes = field("notes", "Notes", {maxlength: 1024});
  const form = h("form", {class: "card form", id: "switch-form", novalidate: true,
                          "data-admin": true},
    h("h2", {}, "New switch"), name.label,
    h("label", {for: "f-type"}, h("span", {}, "Type"), type,
      h("span", {class: "field-error", id: "e-type", role: "alert"})),
    Object.values(extra).map((f) => f.label), notes.label,
    h("p", {class: "form-error error", role: "alert"}),
    h("button", {type: "submit"}, "Create switch"));
  const showFields = () => Object.entries(extra).forEach(([key, f]) => {
    f.label.hidden = !SWITCH_TYPES[type.value].includes(key);
  });
  type.addEventListener("change", showFields);
  showFields();
  submitWith(form, async () => {
    const request = {name: name.input.value.trim(), type: type.value};
    for (const key of SWITCH_TYPES[type.value]) {
      if (extra[key].input.value.trim()) request[key] = extra[key].input.value.trim();
    }
    if (notes.input.value) request.notes = notes.input.value;
    await api("POST", "/v1/switches", request);
    toast(`switch ${request.name} created`);
    name.input.value = "";
    load();
  });
  async function load() {
    const switches = await api("GET", "/v1/switches");
    body.replaceChildren(...switches.map((s) => switchRow(s, load)));
    if (!switches.length) body.append(h("tr", {}, h("td", {colspan: 6, class: "muted"},
      "No switches.")));
  }
  return {
    name: "switches",
    render() {
      load();
      return h("section", {}, h("h1", {}, "Virtual switches"),
        h("table", {class: "grid"}, h("thead", {}, h("tr", {},
          ["Name", "Type", "Network", "Bridge", "Notes", ""].map((t) => h("th", {}, t)))),
          body), form);
    },
    onEvents: (events) => { if (events.some((e) => e.kind === "switch")) load(); },
  };
}

function switchRow(s, reload) {
  const d = s.definition;
  const problem = h("span", {class: "error row-error", role: "alert"});
  return h("tr", {"data-switch": d.name},
    h("td", {}, d.name), h("td", {}, d.type),
    h("td", {}, d.host_address || d.subnet || (d.uplink ? `uplink ${d.uplink}` : "–")),
    h("td", {}, s.bridge, s.bridge_present ? "" : " (missing)"),
    h("td", {}, d.notes || ""),
    h("td", {"data-admin": true}, confirmButton("Delete", `Delete switch ${d.name}?`,
      "delete-switch", async () => {
        problem.textContent = "";
        try {
          await api("DELETE", `/v1/switches/${encodeURIComponent(d.name)}`);
          toast(`switch ${d.name} deleted`);
          reload();
        } catch (error) { problem.textContent = error.message; }
      }), " ", problem));
}

// --- disks ---------------------------------------------------------------------------------
function disksPage() {
  const body = h("tbody", {id: "disk-rows"});
  const roots = h("p", {class: "muted", id: "disk-roots"});
  const info = h("div", {class: "card", id: "disk-info", hidden: true});
  const path = field("path", "Path (inside a storage root)", {maxlength: 4096});
  const size = field("size", "Size", {placeholder: "10G, 512M"});
  const format = h("select", {name: "format", id: "f-format"},
    ["qcow2", "raw"].map((f) => h("option", {value: f}, f)));
  const parent = field("parent", "Parent (optional: a differencing disk)", {maxlength: 4096});
  const form = h("form", {class: "card form", id: "disk-form", novalidate: true,
                          "data-admin": true},
    h("h2", {}, "New disk"), path.label, size.label,
    h("label", {for: "f-format"}, h("span", {}, "Format"), format,
      h("span", {class: "field-error", id: "e-format", role: "alert"})),
    parent.label, h("p", {class: "form-error error", role: "alert"}),
    h("button", {type: "submit"}, "Create disk"));
  submitWith(form, async () => {
    const request = {path: path.input.value.trim(), format: format.value};
    if (size.input.value.trim()) request.size = size.input.value.trim();
    if (parent.input.value.trim()) request.parent = parent.input.value.trim();
    const made = await api("POST", "/v1/disks", request);
    toast(`disk ${made.path} created`);
    load();
  });
  async function showInfo(file) {
    info.hidden = false;
    try {
      const d = await api("GET", `/v1/disks/info?path=${encodeURIComponent(file)}`);
      const rows = [["Path", d.path], ["Format", d.format],
        ["Virtual size", bytes(d.virtual_size)], ["On disk", bytes(d.actual_size)],
        ["Parent", d.backing_file || "–"],
        ["Chain", d.chain.map((c) => c.path || JSON.stringify(c)).join(" → ") || "–"],
        ["Chain problem", d.chain_error || "none"], ["Damaged", d.corrupt ? "yes" : "no"],
        ["Used by", d.used_by.join(", ") || "no VM"]];
      info.replaceChildren(h("h2", {}, "Disk info"), h("dl", {class: "details"},
        rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {"data-field": k.toLowerCase()}, v)])));
    } catch (error) {
      info.replaceChildren(h("p", {class: "error"}, error.message));
    }
  }
  async function load() {
    const listing = await api("GET", "/v1/disks");
    roots.textContent = `Storage roots: ${listing.roots.join(", ")}` +
      (listing.truncated ? " (list truncated)" : "");
    if (!path.input.value) path.input.value = listing.roots[0] + "/";
    body.replaceChildren(...listing.disks.map((d) => h("tr", {"data-path": d.path},
      h("td", {}, d.path), h("td", {}, d.format), h("td", {class: "num"}, bytes(d.file_bytes)),
      h("td", {class: "num"}, bytes(d.allocated_bytes)),
      h("td", {}, d.used_by.join(", ") || "–"),
      h("td", {class: "nowrap"}, d.modified ? when(d.modified) : "–"),
      h("td", {}, h("button", {type: "button", "data-action": "disk-info",
                               onclick: () => showInfo(d.path)}, "Info")))));
  }
  return {
    name: "disks",
    render() {
      load();
      return h("section", {}, h("h1", {}, "Disks"), roots,
        h("table", {class: "grid"}, h("thead", {}, h("tr", {},
          ["Path", "Format", "File size", "Allocated", "Used by", "Modified", ""].map((t) =>
            h("th", {}, t)))), body), info, form);
    },
  };
}

boot().catch((error) => toast(error.message, true));
