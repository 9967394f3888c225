// The login form: posts JSON (never a form post, see parvisor.web.routes) and goes on
// to the page the user asked for, if it is one of ours.
"use strict";
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const body = {user: form.user.value, password: form.password.value,
                token: form.token.value};
  const shown = document.getElementById("login-error");
  shown.textContent = "";
  const response = await fetch("/ui/api/login", {
    method: "POST", headers: {"content-type": "application/json"},
    body: JSON.stringify(body), credentials: "same-origin"});
  if (!response.ok) {
    const answer = await response.json().catch(() => ({}));
    shown.textContent = (answer.error && answer.error.message) || "login failed";
    return;
  }
  const next = new URLSearchParams(location.search).get("next") || "/ui/";
  // only local paths: an attacker's ?next=https://evil must not become a redirect
  location.assign(next.startsWith("/ui/") ? next : "/ui/");
});
