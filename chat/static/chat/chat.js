// Chat page: model picker, GPU panel and the websocket protocol of CONTRACT §4.
// Every piece of server or user text reaches the page through textContent only:
// model output is untrusted and must never become live HTML.
(() => {
  "use strict";

  const config = JSON.parse(document.getElementById("page-config").textContent);
  const $ = (id) => document.getElementById(id);
  const els = {
    messages: $("messages"), composer: $("composer"), model: $("model"), content: $("content"),
    send: $("send"), stop: $("stop"), newChat: $("new-chat"), status: $("status"),
    owner: $("gpu-owner"), local: $("gpu-local"), ollama: $("gpu-ollama"), device: $("gpu-device"),
    memFill: $("gpu-mem-fill"), memText: $("gpu-mem-text"), events: $("gpu-events"),
  };

  const LOGIN_URL = "/accounts/login/?next=/";
  const CLOSE_UNAUTHENTICATED = 4401; // CONTRACT §4: anonymous sockets are closed with it
  const RECONNECT_MIN_MS = 500;
  const RECONNECT_MAX_MS = 5000;
  const GPU_POLL_MS = 5000;
  const GPU_EVENTS_SHOWN = 5;
  const KIND_LABELS = { local: "Local", ollama: "Ollama", openai: "OpenAI" };

  let socket = null;
  let reconnectMs = RECONNECT_MIN_MS;
  let conversation = null;
  let connState = "connecting…";
  let note = "";
  // One reply in flight at a time: until chat.accepted names the conversation,
  // a second send would start a new conversation instead of continuing this one.
  let current = null;
  const byMessage = new Map(); // message id -> reply
  // Frames for a message id we do not know yet, held while our send awaits
  // chat.accepted: the worker's frames travel through the channel layer and may
  // overtake the consumer's own accepted frame.
  const early = new Map();

  // ---- small helpers -------------------------------------------------------

  // Decimal units, so that "GB" on the page means 10^9 bytes.
  function humanBytes(n) {
    if (typeof n !== "number" || !Number.isFinite(n)) return "?";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return i === 0 ? `${n} B` : `${n.toFixed(2)} ${units[i]}`;
  }

  function randomId() {
    // crypto.randomUUID needs a secure context; plain http on a LAN address is not one.
    return Array.from(crypto.getRandomValues(new Uint8Array(16)),
      (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderStatus() {
    els.status.textContent = note ? `${connState} — ${note}` : connState;
  }
  function setConn(text) { connState = text; renderStatus(); }
  function setNote(text) { note = text; renderStatus(); }

  async function getJSON(url) {
    const resp = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    // An expired session shows up as a redirect to the login page (login_required) or a 401.
    if (resp.status === 401 || (resp.redirected && new URL(resp.url).pathname.startsWith("/accounts/login"))) {
      location.assign(LOGIN_URL);
      throw new Error("not logged in");
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    return resp.json();
  }

  function isOpen() { return socket !== null && socket.readyState === WebSocket.OPEN; }

  function updateControls() {
    els.send.disabled = !isOpen() || current !== null || !els.model.value;
    els.stop.disabled = !isOpen() || current === null || current.id === null || current.stopping;
  }

  // ---- models --------------------------------------------------------------

  async function refreshModels() {
    let data;
    try {
      data = await getJSON(config.models_url);
    } catch (err) {
      setNote(`model list unavailable (${err.message})`);
      return;
    }
    const keep = els.model.value; // the user's pick survives a refresh if still usable
    const groups = new Map();
    for (const m of data.models || []) {
      if (!groups.has(m.kind)) groups.set(m.kind, el("optgroup"));
      const label = `${m.resident ? "● " : ""}${m.name}${!m.available && m.detail ? ` — ${m.detail}` : ""}`;
      const opt = el("option", "", label);
      opt.value = m.name;
      opt.disabled = !m.available;
      if (m.detail) opt.title = m.detail;
      groups.get(m.kind).append(opt);
    }
    const ordered = [...Object.keys(KIND_LABELS), ...[...groups.keys()].filter((k) => !(k in KIND_LABELS))];
    els.model.replaceChildren(...ordered.filter((k) => groups.has(k)).map((k) => {
      groups.get(k).label = KIND_LABELS[k] || k;
      return groups.get(k);
    }));
    const usable = (name) => [...els.model.options].some((o) => o.value === name && !o.disabled);
    if (usable(keep)) els.model.value = keep;
    else if (data.default && usable(data.default)) els.model.value = data.default;
    else els.model.value = [...els.model.options].find((o) => !o.disabled)?.value ?? "";
    if (!els.model.value) setNote("no model is available");
    const errors = (data.errors || []).map((e) => `${e.endpoint}: ${e.detail}`);
    if (errors.length) setNote(`model discovery failed: ${errors.join("; ")}`);
    updateControls();
  }

  // ---- GPU panel -----------------------------------------------------------

  // One request at a time, so a slow server does not pile up polls; a refresh
  // asked for meanwhile (say, after a gpu.switch) runs once the current one
  // returns, since that one may predate the switch.
  let gpuInFlight = false;
  let gpuAgain = false;
  async function refreshGpu() {
    if (gpuInFlight) { gpuAgain = true; return; }
    gpuInFlight = true;
    try {
      renderGpu(await getJSON(config.gpu_url));
    } catch (err) {
      els.owner.textContent = `unavailable (${err.message})`;
    } finally {
      gpuInFlight = false;
      if (gpuAgain) { gpuAgain = false; refreshGpu(); }
    }
  }

  function renderGpu(data) {
    // No slot yet (no GPU worker has reported): render placeholders, not stale data.
    const slot = (data.slots || [])[0] || { owner: "no GPU worker", memory: {} };
    const list = (names) => (names && names.length ? names.join(", ") : "none");
    const mem = slot.memory || {};
    els.owner.textContent = slot.owner;
    els.local.textContent = list(slot.local_models);
    els.ollama.textContent = list(slot.ollama_models);
    els.device.textContent = mem.device || "—";
    const share = mem.total ? Math.min(1, mem.allocated / mem.total) : 0;
    els.memFill.style.width = `${(share * 100).toFixed(1)}%`;
    els.memText.textContent = mem.total
      ? `${humanBytes(mem.allocated)} / ${humanBytes(mem.total)} allocated`
      : `${humanBytes(mem.allocated || 0)} allocated`;
    // The API lists events oldest first (CONTRACT §5); show the newest first.
    const events = (data.events || []).filter((e) => e.slot === slot.slot).slice(-GPU_EVENTS_SHOWN).reverse();
    els.events.replaceChildren(...events.map((e) => el("li", "",
      `${e.kind} ${e.model || ""} · freed ${humanBytes(e.freed_bytes)} · ${(Number(e.seconds) || 0).toFixed(2)} s`)));
    if (!events.length) els.events.append(el("li", "muted", "none yet"));
  }

  // ---- messages ------------------------------------------------------------

  // Follow new text only while the reader is at the bottom, so scrolling up to
  // reread is not undone by every delta.
  function following(change) {
    const list = els.messages;
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    change();
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  function appendItem(classes, label, text) {
    const li = el("li", `msg ${classes}`);
    const body = el("div", "msg-body", text);
    const meta = el("p", "msg-meta");
    li.append(el("p", "msg-who", label), body, meta);
    following(() => els.messages.append(li));
    return { li, body, meta };
  }

  function finish(reply, metaText, failed) {
    reply.done = true;
    reply.li.classList.toggle("failed", failed);
    reply.li.removeAttribute("aria-busy");
    if (!reply.text) reply.body.textContent = failed ? "" : "(no output)";
    reply.meta.textContent = metaText;
    if (current === reply) current = null;
    setNote(""); // the switch progress or "stopping…" is over; refreshModels re-reports errors
    updateControls();
    refreshModels();
    refreshGpu();
  }

  function applyDelta(reply, seq, text) {
    // seq counts up from 0 without gaps (CONTRACT §4). Frames can arrive out of
    // order or twice (a retried relay), so hold those ahead of the next expected
    // seq, drop those behind it, and append only a contiguous run.
    if (!Number.isInteger(seq) || seq < reply.nextSeq || reply.held.has(seq)) return;
    reply.held.set(seq, String(text ?? ""));
    while (reply.held.has(reply.nextSeq)) {
      reply.text += reply.held.get(reply.nextSeq);
      reply.held.delete(reply.nextSeq);
      reply.nextSeq += 1;
    }
    if (reply.text) {
      reply.li.classList.remove("placeholder");
      following(() => { reply.body.textContent = reply.text; });
    }
  }

  function describeSwitch(f) {
    const phase = String(f.phase || "");
    const verb = phase.includes("unload") ? "unloading" : phase.includes("load") ? "loading" : phase.replace(/_/g, " ");
    let text = `${verb}${f.model ? ` ${f.model}` : ""}…`;
    if (typeof f.freed_bytes === "number") text += ` freed ${humanBytes(f.freed_bytes)}`;
    if (typeof f.seconds === "number") text += ` in ${f.seconds.toFixed(2)} s`;
    return text;
  }

  // ---- frames from the server ----------------------------------------------

  const handlers = {
    "chat.accepted"(f) {
      const reply = current;
      if (!reply || reply.clientId !== f.client_id) return;
      reply.id = f.message;
      byMessage.set(f.message, reply);
      conversation = f.conversation;
      updateControls();
      const held = early.get(f.message) || [];
      early.clear();
      held.forEach(handle);
    },
    "chat.delta"(f) {
      const reply = byMessage.get(f.message);
      if (reply) applyDelta(reply, f.seq, f.text);
    },
    "gpu.switch"(f) {
      const text = describeSwitch(f);
      setNote(text);
      const reply = byMessage.get(f.message);
      if (reply && !reply.text && !reply.done) reply.body.textContent = text;
      refreshGpu();
    },
    "chat.done"(f) {
      const reply = byMessage.get(f.message);
      if (!reply) return;
      const tokens = f.usage && f.usage.completion_tokens;
      finish(reply, `${reply.model} · ${f.finish_reason}${tokens != null ? ` · ${tokens} tokens` : ""}`, false);
    },
    "chat.error"(f) {
      let reply = f.message != null ? byMessage.get(f.message) : undefined;
      // A send the server rejects outright (unknown model, bad frame) has no
      // message id yet; with one send in flight, the error can only be that one's.
      if (!reply && f.message == null && current && current.id === null) reply = current;
      const text = `error ${f.code}: ${f.detail}`;
      if (reply) finish(reply, `${reply.model} · ${text}`, true);
      else setNote(text);
    },
  };

  const PER_MESSAGE = new Set(["chat.delta", "chat.done", "chat.error"]);

  function handle(frame) {
    if (!frame || !Object.prototype.hasOwnProperty.call(handlers, frame.type)) return;
    const unknown = frame.message != null && !byMessage.has(frame.message);
    if (PER_MESSAGE.has(frame.type) && unknown && current && current.id === null) {
      if (!early.has(frame.message)) early.set(frame.message, []);
      early.get(frame.message).push(frame);
      return;
    }
    handlers[frame.type](frame);
  }

  // ---- websocket -----------------------------------------------------------

  function connect() {
    const url = new URL(config.ws_url, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(url);
    socket.addEventListener("open", () => {
      reconnectMs = RECONNECT_MIN_MS;
      setConn("connected");
      updateControls();
    });
    socket.addEventListener("message", (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      handle(frame);
    });
    socket.addEventListener("close", (event) => {
      if (event.code === CLOSE_UNAUTHENTICATED) {
        location.assign(LOGIN_URL);
        return;
      }
      // Frames for an in-flight reply went to the old socket and are lost.
      if (current) finish(current, `${current.model} · connection lost`, true);
      setConn(`reconnecting in ${(reconnectMs / 1000).toFixed(1)} s…`);
      updateControls();
      // Back off so a server restart is not met by a tight loop of handshakes
      // from every open tab; the cap keeps recovery quick once it is back.
      setTimeout(connect, reconnectMs);
      reconnectMs = Math.min(reconnectMs * 2, RECONNECT_MAX_MS);
    });
  }

  function sendFrame(frame) { socket.send(JSON.stringify(frame)); }

  // ---- user actions --------------------------------------------------------

  function send() {
    const content = els.content.value;
    const model = els.model.value;
    if (!content.trim() || !model || current || !isOpen()) return;
    const clientId = randomId();
    appendItem("user", "You", content);
    const reply = { ...appendItem("assistant placeholder", model, "queued…"),
      model, clientId, id: null, text: "", nextSeq: 0, held: new Map(), done: false, stopping: false };
    reply.li.setAttribute("aria-busy", "true"); // announce the reply once, when complete
    current = reply;
    setNote("");
    sendFrame({ type: "chat.send", model, content, conversation, client_id: clientId });
    els.content.value = "";
    updateControls();
  }

  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });

  els.content.addEventListener("keydown", (event) => {
    // isComposing: Enter that confirms an IME composition must not send.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });

  els.stop.addEventListener("click", () => {
    if (!current || current.id === null || !isOpen()) return;
    current.stopping = true;
    sendFrame({ type: "chat.cancel", message: current.id });
    setNote("stopping…");
    updateControls();
  });

  els.newChat.addEventListener("click", () => {
    if (current && current.id !== null && isOpen()) sendFrame({ type: "chat.cancel", message: current.id });
    current = null;
    conversation = null;
    byMessage.clear();
    early.clear();
    els.messages.replaceChildren();
    setNote("");
    updateControls();
    els.content.focus();
  });

  els.model.addEventListener("change", updateControls);

  refreshModels();
  refreshGpu();
  setInterval(() => { if (!document.hidden) refreshGpu(); }, GPU_POLL_MS);
  connect();
})();
