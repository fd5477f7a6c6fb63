// The chat page: the websocket protocol of CONTRACT §4 (with §8's sources
// and §9's translations), the composer, the model picker, and the wiring of
// the conversation list, the knowledge panel and the GPU panel.
// Every piece of server or user text reaches the page through textContent
// (replies through markdown.js, which builds nodes): model output is
// untrusted and never becomes live HTML.
import { el, request, randomId, setCsrfToken, copyText, humanBytes, HttpError, LOGIN_URL } from "./util.js";
import { Reply } from "./reply.js";
import { GpuPanel, ownerLabel } from "./gpu.js";
import { ConversationList, conversationTitle } from "./conversations.js";
import { KnowledgePanel } from "./knowledge.js";
import { Question } from "./question.js";
import { Translator } from "./translate.js";

const config = JSON.parse(document.getElementById("page-config").textContent);
setCsrfToken(config.csrf_token);

const CLOSE_UNAUTHENTICATED = 4401; // CONTRACT §4: anonymous sockets are closed with it
const RECONNECT_MIN_MS = 500;
const RECONNECT_MAX_MS = 5000;
// The worker saves a streaming reply about once a second (workers/replies.py).
const POLL_MS = 1000;
// Frames for messages not on the page (another conversation, or one still
// loading) are kept for when it is opened; bounded, oldest message first out.
const EARLY_MESSAGES_MAX = 50;
const MODELS_REFRESH_MS = 30000;
const KIND_LABELS = () => ({ local: gettext("Local"), ollama: "Ollama", openai: gettext("OpenAI-compatible") });

const $ = (id) => document.getElementById(id);
const els = {
  layout: $("layout"), messages: $("messages"), empty: $("empty"), composer: $("composer"), model: $("model"),
  content: $("content"), send: $("send"), stop: $("stop"), status: $("status"), alert: $("alert"),
  title: $("chat-title"), sidebar: $("sidebar"), gpuPanel: $("gpu-panel"),
  toggleSidebar: $("toggle-sidebar"), toggleGpu: $("toggle-gpu"), newChat: $("new-chat"),
  knowledgePicked: $("knowledge-picked"),
};

let socket = null;
let connectedOnce = false;
let reconnectMs = RECONNECT_MIN_MS;
let conversation = config.conversation;
let pending = null; // the send awaiting chat.accepted: { clientId, content, model, reply, question }
let loadToken = 0;
let loading = false; // a conversation is being read: a send now would land before its history
let modelsLoaded = false;
const replies = new Map(); // message id -> Reply, for the conversation shown
const early = new Map(); // message id -> frames that came before the message was on the page
const unnamed = new Set(); // Questions sent from this page whose ids are not known yet
const translator = new Translator({
  send: (frame) => {
    if (!isOpen()) return false;
    sendFrame(frame);
    return true;
  },
});

// ---- helpers ------------------------------------------------------------------

// Follow new text only while the reader is at the bottom, so that scrolling
// up to reread is not undone by every delta. Every change to the list (a
// delta, a GPU step, a reply's figures) passes through the observer.
let stick = true;
function atBottom() {
  const list = els.messages;
  return list.scrollHeight - list.scrollTop - list.clientHeight < 60;
}
function toBottom() {
  stick = true;
  els.messages.scrollTop = els.messages.scrollHeight;
}
els.messages.addEventListener("scroll", () => { stick = atBottom(); }, { passive: true });
new MutationObserver(() => { if (stick) els.messages.scrollTop = els.messages.scrollHeight; })
  .observe(els.messages, { childList: true, subtree: true, characterData: true, attributes: true,
    attributeFilter: ["hidden", "class"] });

const formatters = { bytes: humanBytes, owner: ownerLabel };

function setStatus(text) { els.status.textContent = text; }
function setAlert(text) { els.alert.textContent = text; els.alert.hidden = !text; }

function isOpen() { return socket !== null && socket.readyState === WebSocket.OPEN; }

// The reply this page is waiting on in the conversation shown, if any: one
// at a time, since the next question's history must include this answer.
function active() {
  if (pending) return pending.reply;
  return [...replies.values()].find((r) => !r.done) || null;
}

function updateControls() {
  const busy = active();
  els.send.disabled = !isOpen() || loading || Boolean(busy) || !els.model.value || !els.content.value.trim();
  els.stop.disabled = !isOpen() || !busy || busy.id === null || busy.stopping;
  els.stop.hidden = !busy;
  const replyItems = els.messages.querySelectorAll("li.msg.assistant");
  const last = replyItems[replyItems.length - 1];
  for (const reply of replies.values()) {
    reply.regenButton.hidden = reply.li !== last || Boolean(busy) || !isOpen();
  }
  els.empty.hidden = els.messages.children.length > 0;
}

function setTitle() {
  const title = conversation ? conversations.titleOf(conversation) : null;
  els.title.textContent = title || (conversation ? "…" : gettext("New chat"));
  document.title = `${title || gettext("New chat")} · GPU Chat`;
}

// ---- messages -------------------------------------------------------------------

function newReply(model) {
  const reply = new Reply({ model, formatters, translations: translator.create({ markdown: true }) });
  wireReply(reply);
  return reply;
}

function storedQuestion(m) {
  const question = new Question({ content: m.content, translations: translator.create({ markdown: false }) });
  translator.attach(m.id, question.translations);
  question.stored(m);
  return question;
}

function addReply(reply) {
  replies.set(reply.id, reply);
  translator.attach(reply.id, reply.translations);
  replay(reply.id);
  if (reply.wantsPolling) poll(reply);
}

function replay(id) {
  const frames = early.get(id) || [];
  early.delete(id);
  frames.forEach(handle);
}

// Reads a waiting or restored reply back from the database once a second:
// its place in the queue, and the saved text that its deltas line up with.
function poll(reply) {
  if (reply.polling) return;
  reply.polling = true;
  const tick = async () => {
    if (!reply.wantsPolling || replies.get(reply.id) !== reply) { reply.polling = false; return; }
    try {
      reply.polled(await request(`${config.messages_url}${reply.id}/`));
      if (reply.done) afterEnd(reply);
    } catch (err) {
      if (err instanceof HttpError && err.status === 404) { reply.polling = false; return; }
    }
    setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

async function afterEnd(reply) {
  updateControls();
  conversations.refresh();
  refreshModels();
  gpu.refresh();
  nameQuestions();
  try {
    reply.finalize(await request(`${config.messages_url}${reply.id}/`));
  } catch { /* the frame's figures stay */ }
  updateControls();
}

// Questions sent from this page learn their ids from the stored conversation
// (by the client_id they were sent with) once their reply has ended; then
// they can be translated.
async function nameQuestions() {
  if (!unnamed.size || conversation === null) return;
  const token = loadToken;
  let data;
  try {
    data = await request(`${config.conversations_url}${conversation}/`);
  } catch { return; } // the next reply's end tries again
  if (token !== loadToken) return;
  for (const question of unnamed) {
    const m = data.messages.find((x) => x.role === "user" && x.client_id === question.clientId);
    if (!m) continue;
    unnamed.delete(question);
    translator.attach(m.id, question.translations);
    question.stored(m);
  }
}

// Shows a conversation from the database; answers its messages, or null.
async function openConversation(id, { push = false, replace = false } = {}) {
  const token = ++loadToken;
  conversation = id;
  pending = null;
  replies.clear();
  unnamed.clear();
  translator.clear();
  els.messages.replaceChildren();
  conversations.setActive(id);
  const url = id ? conversations.href(id) : config.page_url;
  if (push && location.pathname !== url) history.pushState({ conversation: id }, "", url);
  if (replace) history.replaceState({ conversation: id }, "", url);
  setTitle();
  closeDrawers();
  loading = id !== null;
  updateControls();
  if (id === null) return null;
  els.messages.setAttribute("aria-busy", "true");
  let data;
  try {
    data = await request(`${config.conversations_url}${id}/`);
  } catch (err) {
    if (token !== loadToken) return null;
    loading = false;
    updateControls();
    els.messages.removeAttribute("aria-busy");
    setAlert(err instanceof HttpError && err.status === 404 ? gettext("That conversation no longer exists.")
      : gettext("The conversation could not be loaded; it will be retried when the connection is back."));
    if (err instanceof HttpError && err.status === 404) openConversation(null, { replace: true });
    return null;
  }
  if (token !== loadToken) return null; // another conversation was opened meanwhile
  loading = false;
  els.messages.removeAttribute("aria-busy");
  els.title.textContent = conversationTitle(data.conversation);
  document.title = `${conversationTitle(data.conversation)} · GPU Chat`;
  for (const m of data.messages) {
    if (m.role === "user") {
      els.messages.append(storedQuestion(m).li);
    } else {
      const reply = Reply.restored(m, formatters, translator.create({ markdown: true }));
      wireReply(reply);
      reply.translations.restore(m.translations);
      els.messages.append(reply.li);
      addReply(reply);
    }
  }
  const last = [...data.messages].reverse().find((m) => m.role === "assistant");
  if (last && usable(last.model)) els.model.value = last.model;
  toBottom();
  updateControls();
  return data.messages;
}

function wireReply(reply) {
  reply.copyButton.addEventListener("click", async () => {
    const ok = await copyText(reply.text);
    reply.copyButton.textContent = ok ? gettext("Copied") : gettext("Copy failed");
    setTimeout(() => { reply.copyButton.textContent = gettext("Copy"); }, 1500);
  });
  reply.regenButton.addEventListener("click", () => regenerate(reply));
}

// ---- frames from the server --------------------------------------------------

const handlers = {
  "chat.accepted"(f) {
    if (!pending || pending.clientId !== f.client_id) return;
    const { reply } = pending;
    pending = null;
    reply.id = f.message;
    if (conversation === null) {
      conversation = f.conversation;
      conversations.active = f.conversation;
      history.pushState({ conversation }, "", conversations.href(conversation));
    }
    conversations.refresh().then(setTitle);
    addReply(reply);
    updateControls();
  },
  "chat.sources"(f) { replies.get(f.message)?.setSources(f.sources); },
  "chat.delta"(f) { replies.get(f.message)?.delta(f.seq, f.text); },
  "gpu.switch"(f) {
    replies.get(f.message)?.step(f);
    gpu.onSwitch(f);
  },
  "chat.done"(f) { end(f); },
  "chat.error"(f) {
    // Stop pressed as the reply ended: it has ended, which is what was asked.
    if (f.code === "already_finished") return;
    if (f.message == null) {
      // A send the server refused outright (unknown model, endpoint down):
      // nothing was stored, so the question goes back into the composer.
      if (pending) {
        pending.reply.li.remove();
        pending.question.li.remove();
        unnamed.delete(pending.question);
        if (!els.content.value) els.content.value = pending.content;
        pending = null;
      }
      // A picked base gone or indexing again (unknown_knowledge, knowledge_not_ready).
      if (f.code.includes("knowledge")) knowledge.refresh();
      setAlert(`${f.detail} (${f.code})`);
      updateControls();
      return;
    }
    end(f);
  },
};

function end(f) {
  const reply = replies.get(f.message);
  if (!reply) { conversations.refresh(); return; }
  reply.ended(f);
  afterEnd(reply);
}

const PER_MESSAGE = new Set(["chat.sources", "chat.delta", "chat.done", "chat.error", "gpu.switch"]);

function handle(frame) {
  if (!frame || translator.handle(frame)) return;
  if (!Object.prototype.hasOwnProperty.call(handlers, frame.type)) return;
  if (PER_MESSAGE.has(frame.type) && frame.message != null && !replies.has(frame.message)) {
    // A worker's frames can overtake the consumer's own chat.accepted, and
    // a reloaded conversation's frames can come before its messages do.
    if (!early.has(frame.message)) {
      if (early.size >= EARLY_MESSAGES_MAX) early.delete(early.keys().next().value);
      early.set(frame.message, []);
    }
    early.get(frame.message).push(frame);
    if (frame.type === "gpu.switch") gpu.onSwitch(frame);
    if (frame.type === "chat.done" || frame.type === "chat.error") conversations.refresh();
    return;
  }
  handlers[frame.type](frame);
}

// ---- websocket -----------------------------------------------------------------

function connect() {
  const url = new URL(config.ws_url, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(url);
  socket.addEventListener("open", () => {
    els.layout.dataset.socket = "open"; // for the styles, and for tests to wait on
    reconnectMs = RECONNECT_MIN_MS;
    setStatus("");
    if (connectedOnce) resync();
    connectedOnce = true;
    updateControls();
  });
  socket.addEventListener("message", (event) => {
    let frame;
    try { frame = JSON.parse(event.data); } catch { return; }
    handle(frame);
  });
  socket.addEventListener("close", (event) => {
    els.layout.dataset.socket = "closed";
    if (event.code === CLOSE_UNAUTHENTICATED) {
      location.assign(LOGIN_URL + encodeURIComponent(location.pathname));
      return;
    }
    setStatus(interpolate(gettext("Connection lost; reconnecting in %(s)s s…"),
      { s: (reconnectMs / 1000).toFixed(1) }, true));
    updateControls();
    // Back off so that a server restart is not met by a tight loop of
    // handshakes from every open tab; the cap keeps recovery quick.
    setTimeout(connect, reconnectMs);
    reconnectMs = Math.min(reconnectMs * 2, RECONNECT_MAX_MS);
  });
}

// After a reconnect: frames sent while the socket was down are lost, so the
// conversation is read again from the database (the consumer has already
// re-joined the groups of our unfinished replies; their deltas line up with
// the saved text, see reply.js). A send whose chat.accepted never came may
// not have arrived: unless the database has it, its text goes back into
// the composer.
async function resync() {
  const unconfirmed = pending;
  conversations.refresh();
  const messages = await openConversation(conversation);
  if (!unconfirmed || (messages || []).some((m) => m.client_id === unconfirmed.clientId)) return;
  if (!els.content.value) els.content.value = unconfirmed.content;
  setAlert(gettext("The connection dropped before your message was confirmed. Check the conversation, then send it again if it is missing."));
  updateControls();
}

function sendFrame(frame) { socket.send(JSON.stringify(frame)); }

// ---- models ------------------------------------------------------------------------

function usable(name) { return [...els.model.options].some((o) => o.value === name && !o.disabled); }

async function refreshModels() {
  let data;
  try {
    data = await request(config.models_url);
  } catch {
    if (!modelsLoaded) setAlert(gettext("The model list could not be loaded."));
    return;
  }
  const keep = els.model.value; // the user's pick survives a refresh if still usable
  const labels = KIND_LABELS();
  const groups = new Map(Object.keys(labels).map((k) => [k, el("optgroup")]));
  for (const m of data.models || []) {
    if (!groups.has(m.kind)) groups.set(m.kind, el("optgroup"));
    const label = m.resident ? interpolate(gettext("%(name)s (on the GPU)"), { name: m.name }, true) : m.name;
    const option = el("option", "", label);
    option.value = m.name;
    option.disabled = !m.available;
    if (m.resident) option.dataset.resident = "";
    groups.get(m.kind).append(option);
  }
  for (const e of data.errors || []) {
    // An endpoint that is down stays visible, marked, in its own group.
    const option = el("option", "", interpolate(gettext("unavailable: %(url)s"), { url: e.endpoint }, true));
    option.disabled = true;
    option.value = "";
    option.title = e.detail;
    option.dataset.down = "";
    groups.get(e.kind)?.append(option);
  }
  const filled = [...groups].filter(([, g]) => g.children.length);
  for (const [kind, group] of filled) group.label = labels[kind] || kind;
  els.model.replaceChildren(...filled.map(([, g]) => g));
  if (usable(keep)) els.model.value = keep;
  else if (data.default && usable(data.default)) els.model.value = data.default;
  else els.model.value = [...els.model.options].find((o) => !o.disabled)?.value ?? "";
  modelsLoaded = true;
  updateControls();
}

// ---- user actions -------------------------------------------------------------------

function send(content, model) {
  if (!content.trim() || !model || loading || active() || !isOpen()) return false;
  setAlert("");
  const reply = newReply(model);
  const clientId = randomId();
  const question = new Question({ content, clientId, translations: translator.create({ markdown: false }) });
  unnamed.add(question);
  els.messages.append(question.li, reply.li);
  toBottom();
  reply.render();
  pending = { clientId, content, model, reply, question };
  const frame = { type: "chat.send", model, content, conversation, client_id: clientId };
  const bases = knowledge.picked();
  if (bases.length) frame.knowledge = bases;
  sendFrame(frame);
  updateControls();
  return true;
}

async function regenerate(reply) {
  if (active() || !isOpen()) return;
  let question;
  try {
    question = await request(`${config.messages_url}${reply.id}/`, { method: "DELETE" });
  } catch (err) {
    setAlert(err.message);
    return;
  }
  const asked = reply.li.previousElementSibling;
  if (asked && asked.classList.contains("user")) asked.remove();
  reply.li.remove();
  replies.delete(reply.id);
  translator.forget(reply.id);
  send(question.content, els.model.value || question.model);
}

els.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  if (send(els.content.value, els.model.value)) {
    els.content.value = "";
    autosize();
    updateControls();
  }
});

els.content.addEventListener("keydown", (event) => {
  // isComposing: the Enter that confirms an IME composition (Chinese input)
  // must not send.
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    els.composer.requestSubmit();
  }
});

function autosize() {
  els.content.style.height = "auto";
  els.content.style.height = `${Math.min(els.content.scrollHeight + 2, window.innerHeight * 0.4)}px`;
}
els.content.addEventListener("input", () => { autosize(); updateControls(); });
els.model.addEventListener("change", updateControls);

els.stop.addEventListener("click", () => {
  const reply = active();
  if (!reply || reply.id === null || !isOpen()) return;
  reply.stop();
  sendFrame({ type: "chat.cancel", message: reply.id });
  updateControls();
});

els.newChat.addEventListener("click", () => {
  openConversation(null, { push: true });
  els.content.focus();
});

// Copy buttons of code blocks, for every reply at once.
els.messages.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy='code']");
  if (!button) return;
  const code = button.closest(".md-code")?.querySelector("code")?.textContent ?? "";
  button.textContent = (await copyText(code)) ? gettext("Copied") : gettext("Copy failed");
  setTimeout(() => { button.textContent = gettext("Copy code"); }, 1500);
});

// The language switch (base.html) comes back to the conversation shown,
// whose URL the page set after it was rendered.
document.querySelector(".lang-switch")?.addEventListener("submit", (event) => {
  event.currentTarget.elements.next.value = location.pathname;
});

// ---- drawers (narrow screens) --------------------------------------------------

function setDrawer(name, open) {
  const button = name === "sidebar" ? els.toggleSidebar : els.toggleGpu;
  const panel = name === "sidebar" ? els.sidebar : els.gpuPanel;
  els.layout.dataset[name] = open ? "open" : "closed";
  button.setAttribute("aria-expanded", String(open));
  if (open && getComputedStyle(panel).position === "fixed") panel.querySelector("button, a, [tabindex]")?.focus();
}

function closeDrawers() {
  for (const [name, button] of [["sidebar", els.toggleSidebar], ["gpu", els.toggleGpu]]) {
    if (els.layout.dataset[name] === "open" && getComputedStyle(name === "sidebar" ? els.sidebar : els.gpuPanel)
      .position === "fixed") {
      setDrawer(name, false);
      if (document.activeElement === document.body) button.focus();
    }
  }
}

els.toggleSidebar.addEventListener("click", () => setDrawer("sidebar", els.layout.dataset.sidebar !== "open"));
els.toggleGpu.addEventListener("click", () => setDrawer("gpu", els.layout.dataset.gpu !== "open"));
document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape") return;
  for (const [name, button, panel] of [["sidebar", els.toggleSidebar, els.sidebar], ["gpu", els.toggleGpu, els.gpuPanel]]) {
    if (els.layout.dataset[name] === "open" && getComputedStyle(panel).position === "fixed") {
      setDrawer(name, false);
      button.focus();
    }
  }
});
$("drawer-backdrop").addEventListener("click", closeDrawers);

// ---- start -----------------------------------------------------------------------------

const gpu = new GpuPanel({ url: config.gpu_url, root: els.gpuPanel, chip: els.toggleGpu });
const conversations = new ConversationList({
  url: config.conversations_url, pageUrl: config.page_url, root: els.sidebar,
  onOpen: (id, options) => openConversation(id, options),
  onDeleted: (id) => { if (id === conversation) openConversation(null, { push: true }); },
});
conversations.onRenamed = (id) => { if (id === conversation) setTitle(); };
const knowledge = new KnowledgePanel({
  url: config.knowledge_url, root: $("knowledge"),
  onChange: () => {
    const names = knowledge.pickedBases().map((b) => b.name);
    els.knowledgePicked.textContent = interpolate(gettext("Answers will use: %(names)s"),
      { names: names.join(", ") }, true);
    els.knowledgePicked.hidden = !names.length;
  },
});

window.addEventListener("popstate", (event) => {
  openConversation(event.state && event.state.conversation != null ? event.state.conversation : null);
});

history.replaceState({ conversation }, "", location.pathname);
// Wide screens show the GPU panel as a column; narrower ones keep it in a drawer.
if (window.matchMedia("(min-width: 1100px)").matches) setDrawer("gpu", true);
gpu.start();
knowledge.refresh();
conversations.refresh().then(setTitle);
refreshModels().then(() => openConversation(conversation));
setInterval(() => { if (!document.hidden) refreshModels(); }, MODELS_REFRESH_MS);
connect();
