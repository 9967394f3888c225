// The graphical console of one VM: noVNC's RFB client over the WebSocket
// /v1/vms/NAME/display, which the host service bridges to QEMU's VNC socket.
//
// The server decides who may connect (administrators, same origin); a viewer gets a
// message here and the server would refuse the socket anyway. Data reaches the DOM as
// text only. The state of the connection is in #status[data-state]:
// connecting | connected | disconnected | failed (tests and people read it there).
import RFB from "/ui/vendor/@novnc/novnc/core/rfb.js";

const $ = (id) => document.getElementById(id);

function vmName() {
  const match = location.pathname.match(/^\/ui\/vms\/([^/]+)\/display$/);
  return match ? decodeURIComponent(match[1]) : "";
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

async function session() {
  const response = await fetch("/ui/api/session", {credentials: "same-origin"});
  if (response.status === 401) {
    location.assign("/ui/login?next=" + encodeURIComponent(location.pathname));
    return null;
  }
  return response.json();
}

function displayUrl(name) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/vms/${encodeURIComponent(name)}/display`;
}

function connect(name) {
  const rfb = new RFB($("screen"), displayUrl(name), {shared: true});
  rfb.scaleViewport = $("scale").checked;
  rfb.background = "#111";
  $("scale").addEventListener("change", () => { rfb.scaleViewport = $("scale").checked; });
  $("cad").addEventListener("click", () => rfb.sendCtrlAltDel());
  rfb.addEventListener("connect", () => {
    setStatus("connected", "connected");
    $("cad").disabled = false;
    rfb.focus();
  });
  rfb.addEventListener("disconnect", (event) => {
    $("cad").disabled = true;
    // a clean end is the server closing (VM off, QEMU gone): its reason is the message
    setStatus(event.detail.clean ? "disconnected" : "failed",
              event.detail.clean ? "disconnected" : "connection failed");
    $("message").textContent = event.detail.clean
      ? "The display closed (is the VM running?). Reload the page to reconnect."
      : "Could not reach the display: the VM may be off, or your session ended.";
  });
  rfb.addEventListener("securityfailure", (event) => {
    $("message").textContent = `VNC security failure: ${event.detail.reason || event.detail.status}`;
  });
  window.__rfb = rfb;      // for tests and the browser's devtools
}

async function main() {
  const name = vmName();
  $("vm-name").textContent = name;
  $("back").href = `/ui/vms/${encodeURIComponent(name)}`;
  document.title = `parvisor - ${name} - display`;
  const who = await session();
  if (!who) return;
  document.body.dataset.role = who.role;
  $("who").textContent = `${who.user} (${who.role})`;
  if (who.role !== "administrator") {
    setStatus("failed", "not allowed");
    $("message").textContent = "The graphical console needs the administrator role.";
    return;
  }
  connect(name);
}

main();
