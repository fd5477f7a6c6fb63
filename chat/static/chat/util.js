// Helpers shared by the chat page's modules. Text reaches the page through
// textContent only (el's third argument); nothing here builds HTML.

export const LOGIN_URL = "/accounts/login/?next=";

export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
const ICONS = {
  rename: "M4 20h4L19 9l-4-4L4 16v4zM14 6l4 4",
  delete: "M5 7h14M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3",
  upload: "M12 16V4M7 9l5-5 5 5M5 20h14",
};

// A line icon for an icon button; the button carries the accessible name.
export function icon(name) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  const path = document.createElementNS(SVG_NS, "path");
  path.setAttribute("d", ICONS[name]);
  svg.append(path);
  return svg;
}

// A button showing only an icon, named for screen readers and on hover;
// `className` adds the caller's own classes.
export function iconButton(name, label, onClick, className = "") {
  const button = el("button", `icon-button ${className}`.trim());
  button.type = "button";
  button.dataset.role = name;
  button.setAttribute("aria-label", label);
  button.title = label;
  button.append(icon(name));
  button.addEventListener("click", onClick);
  return button;
}

// "Delete …? [Delete] [Cancel]" in place of a list row's contents, as a
// labelled group, Cancel focused: `onYes` on Delete, `onNo` on Cancel or
// Escape. `prefix` names its classes and ids (`${prefix}-confirm-${id}`).
export function confirmRow(li, { prefix, id, message, onYes, onNo }) {
  li.classList.add("confirming");
  const text = el("span", `${prefix}-confirm-text`, message);
  text.id = `${prefix}-confirm-${id}`;
  const yes = el("button", "danger", gettext("Delete"));
  yes.type = "button";
  const no = el("button", "secondary", gettext("Cancel"));
  no.type = "button";
  yes.addEventListener("click", onYes);
  no.addEventListener("click", onNo);
  li.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && li.classList.contains("confirming")) { event.stopPropagation(); onNo(); }
  });
  const box = el("div", `${prefix}-confirm`);
  box.setAttribute("role", "group");
  box.setAttribute("aria-labelledby", text.id);
  box.append(text, yes, no);
  li.replaceChildren(box);
  no.focus();
}

// Decimal units, so that "GB" on the page means 10^9 bytes, as in the README.
export function humanBytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "?";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return i === 0 ? `${n} B` : `${n.toFixed(2)} ${units[i]}`;
}

export function seconds(s) {
  const value = Number(s) || 0;
  return interpolate(gettext("%(s)s s"), { s: value < 10 ? value.toFixed(2) : value.toFixed(1) }, true);
}

export function randomId() {
  // crypto.randomUUID needs a secure context; plain http on a LAN address is not one.
  return Array.from(crypto.getRandomValues(new Uint8Array(16)),
    (b) => b.toString(16).padStart(2, "0")).join("");
}

let csrfToken = "";
export function setCsrfToken(token) { csrfToken = token; }

export class HttpError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error.detail : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// JSON in and out, same-origin, with the CSRF token on anything that writes.
// A FormData body goes as multipart (uploads), with the boundary the browser
// sets itself. An expired session (a redirect to the login page, or 401)
// goes to log in.
export async function request(url, { method = "GET", body } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRFToken"] = csrfToken;
  const multipart = body instanceof FormData;
  if (body !== undefined && !multipart) headers["Content-Type"] = "application/json";
  const resp = await fetch(url, {
    method, headers, credentials: "same-origin",
    body: body === undefined || multipart ? body : JSON.stringify(body),
  });
  if (resp.status === 401 || (resp.redirected && new URL(resp.url).pathname.startsWith("/accounts/login"))) {
    location.assign(LOGIN_URL + encodeURIComponent(location.pathname));
    throw new HttpError(401, null);
  }
  if (resp.status === 204) return null;
  const data = await resp.json().catch(() => null);
  if (!resp.ok) throw new HttpError(resp.status, data);
  return data;
}

export const getJSON = (url) => request(url);

// Clipboard: the async API needs a secure context (https or localhost); on
// plain http to a LAN address fall back to a hidden textarea and execCommand.
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch { /* permission refused: try the old way */ }
  }
  const area = el("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch { ok = false; }
  area.remove();
  return ok;
}
