// The parvisor web console: one page shell, drawn by the URL, fed by the JSON API
// (/v1, the same routes the CLI uses) and by a Server-Sent Events stream.
//
// Rules kept here: every piece of data reaches the DOM through textContent or an
// attribute (never innerHTML), so a VM's notes show as text; every change carries the
// CSRF token; what a viewer may not do is hidden, and the server refuses it anyway.
"use strict";

const state = {role: "", csrf: "", vms: [], vmsAt: 0, page: null};

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
  Object.assign(state, {role: session.role, csrf: session.csrf});
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
  ["name", "Name"], ["state", "State"], ["vcpus", "vCPUs"], ["memory_bytes", "Memory"],
  ["uptime_s", "Uptime"], ["heartbeat", "Heartbeat"]];

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
    h("td", {class: "num"}, vm.vcpus),
    h("td", {class: "num"}, bytes(vm.memory_current_bytes ?? vm.memory_bytes)),
    h("td", {class: "num uptime"}, duration(liveUptime(vm))),
    h("td", {}, badge(vm.heartbeat)));
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
    events: h("tbody", {id: "vm-events"}), console: consolePanel(name)};
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
      return h("section", {},
        h("div", {class: "bar"}, h("a", {href: "/ui/"}, "← all VMs"), parts.title, parts.state,
          h("a", {href: `/ui/vms/${encodeURIComponent(name)}/display`, id: "display-link",
                  class: "button", "data-admin": true}, "Display")),
        parts.actions,
        h("div", {class: "columns"},
          h("div", {class: "card"}, h("h2", {}, "Definition"), parts.details),
          h("div", {class: "card"}, h("h2", {}, "Devices"), parts.devices,
            h("h2", {"data-admin": true}, "Change vCPUs / memory"), parts.hotadd)),
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
    },
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
const FIELD_ALIASES = {memory_bytes: "memory", max_memory_bytes: "memory"};

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

boot().catch((error) => toast(error.message, true));
