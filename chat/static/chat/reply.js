// One assistant reply on the page: its text as deltas arrive, the GPU switch
// steps and queue place while it waits, and its figures once it is done.
//
// Text and `seq` (CONTRACT §4): a reply sent from this page knows every
// delta from seq 0 and appends them in order ("anchored"). A reply found
// already streaming (page reload, reconnect) starts from the text the worker
// saved in the database, about once a second, which covers deltas 0..N-1 for
// an N nobody records. It is deduplicated by content: the page shows only
// the saved text (always a true prefix) until the deltas it has received
// since, s0..m, line up with its end: the longest run s0..j-1 whose text the
// saved text ends with fixes N = j, and from then on deltas append by seq.
// Until then it re-reads the saved text every second, which also covers
// deltas lost while the socket was down. A run can line up by coincidence
// (a model repeating itself), so when the reply ends the page replaces its
// text with the stored final text: what stays on screen is always the
// database's.
//
// A knowledge-assisted reply also shows its sources (sources.js), and a
// finished one its translations (translate.js, made by the page).
import { el, seconds } from "./util.js";
import { renderMarkdown } from "./markdown.js";
import { citationClicked, citeMarks, sourcesElement } from "./sources.js";

const FINISHED = new Set(["done", "cancelled", "error"]);

function switchText(f) {
  const model = f.model || "";
  const values = { model, s: seconds(f.seconds), endpoint: f.endpoint || "", detail: f.detail || "",
    n: f.generations };
  // "warm": the weights move between the GPU and pinned host memory
  // instead of being dropped and read from disk again (ModelConfig.warm_offload).
  const warm = Boolean(f.warm);
  const text = {
    unloading_local: warm ? gettext("Moving %(model)s to host memory…") : gettext("Unloading %(model)s from the GPU…"),
    unloaded_local: warm ? gettext("Moved %(model)s to host memory: freed %(freed)s in %(s)s")
      : gettext("Unloaded %(model)s: freed %(freed)s in %(s)s"),
    loading_local: warm ? gettext("Moving %(model)s back to the GPU…") : gettext("Loading %(model)s…"),
    loaded_local: warm ? gettext("Moved %(model)s back to the GPU in %(s)s") : gettext("Loaded %(model)s in %(s)s"),
    waiting_for_ollama: ngettext("Waiting for %(n)s Ollama reply to finish…",
      "Waiting for %(n)s Ollama replies to finish…", f.generations || 1),
    unloading_ollama: gettext("Asking Ollama to free the GPU…"),
    unloaded_ollama: gettext("Ollama unloaded %(model)s: freed %(freed)s in %(s)s"),
    ollama_unreachable: gettext("Ollama at %(endpoint)s does not answer; going on without it"),
    preload_failed: gettext("Could not preload %(model)s: %(detail)s"),
    owner: gettext("The GPU now belongs to %(owner)s"),
  }[f.phase];
  return { text, values };
}

// A message waiting for the GPU: its place in its owner's queue and the
// scheduler's estimate (gpu_manager/scheduler.py). The sentence names who
// holds the GPU when that is not the message's own side.
function queuedText(f, kind) {
  const values = { n: f.position, s: Math.max(1, Math.round(Number(f.eta_seconds) || 0)) };
  const text = {
    local: gettext("Queued, place %(n)s — the GPU is the local models'; your turn in about %(s)s s"),
    ollama: gettext("Queued, place %(n)s — the GPU is Ollama's; your turn in about %(s)s s"),
    openai: gettext("Queued, place %(n)s — the GPU is an OpenAI endpoint's; your turn in about %(s)s s"),
  }[f.owner];
  return interpolate(f.owner === kind || !text ? gettext("Queued, place %(n)s; about %(s)s s") : text, values, true);
}

// What a model's name says of its kind (chat/catalog.py PREFIXES).
function kindOf(model) {
  return /^(ollama|openai)_/.exec(model)?.[1] || "local";
}

// Phases of one step share a key: "unloading_local" and "unloaded_local" of
// a model, or Ollama's unload of one endpoint however it ends.
function stepKey(f) {
  if (/^(un)?load(ing|ed)_ollama$|^ollama_unreachable$/.test(f.phase)) return `ollama_unload:${f.endpoint || ""}`;
  const local = /^(un)?load(?:ing|ed)_local$/.exec(f.phase);
  if (local) return `${local[1] ? "unload" : "load"}:${f.model || ""}`;
  return String(f.phase);
}

export class Reply {
  constructor({ model, formatters, translations }) {
    this.id = null;
    this.model = model;
    this.fmt = formatters; // { bytes, owner }
    this.text = "";       // anchored: every delta up to nextSeq - 1
    this.base = "";       // not anchored: the text saved in the database
    this.nextSeq = 0;     // null until anchored
    this.held = new Map();
    this.status = "queued";
    this.done = false;
    this.stopping = false;
    this.queuePosition = null;
    this.renderQueued = false;
    this.li = el("li", "msg assistant");
    this.li.setAttribute("aria-busy", "true"); // announce the reply once, when complete
    const head = el("p", "msg-who");
    head.append(el("span", "visually-hidden", gettext("Reply from")), el("span", "msg-model", model));
    this.steps = el("ul", "msg-steps");
    this.steps.setAttribute("aria-label", gettext("GPU steps"));
    this.body = el("div", "msg-body md");
    this.body.addEventListener("click", citationClicked);
    this.sources = [];
    this.sourcesSlot = el("div", "msg-sources-slot");
    this.translations = translations;
    this.meta = el("p", "msg-meta");
    this.error = el("p", "msg-error");
    this.actions = el("div", "msg-actions");
    this.copyButton = this.action("copy", gettext("Copy"));
    this.regenButton = this.action("regenerate", gettext("Regenerate"));
    this.regenButton.title = gettext("Ask again, with the model selected below");
    this.actions.append(translations.group);
    this.actions.hidden = true;
    this.li.append(head, this.steps, this.body, this.error, this.sourcesSlot, translations.list, this.meta,
      this.actions);
  }

  action(name, label) {
    const button = el("button", `msg-action msg-${name}`, label);
    button.type = "button";
    button.dataset.action = name;
    this.actions.append(button);
    return button;
  }

  static restored(data, formatters, translations) {
    const reply = new Reply({ model: data.model, formatters, translations });
    reply.id = data.id;
    reply.setSources(data.sources);
    if (FINISHED.has(data.status)) {
      reply.finalize(data);
    } else {
      reply.status = data.status;
      reply.base = data.content;
      reply.nextSeq = null;
      reply.queuePosition = data.queue_position;
      reply.render();
    }
    return reply;
  }

  get anchored() { return this.nextSeq !== null; }
  get shown() { return this.anchored ? this.text : this.base; }
  // The reply needs the database: its saved text to line up with, or its
  // place in the queue while nothing has been written.
  get wantsPolling() { return !this.done && (!this.anchored || (this.nextSeq === 0 && this.status === "queued")); }

  delta(seq, text) {
    if (this.done || !Number.isInteger(seq) || this.held.has(seq) || (this.anchored && seq < this.nextSeq)) return;
    this.held.set(seq, String(text ?? ""));
    this.status = "running";
    this.queueNote?.remove();
    if (!this.anchored) this.anchor();
    this.drain();
    this.render();
  }

  drain() {
    if (!this.anchored) return;
    while (this.held.has(this.nextSeq)) {
      this.text += this.held.get(this.nextSeq);
      this.held.delete(this.nextSeq);
      this.nextSeq += 1;
    }
  }

  anchor() {
    if (this.held.has(0)) {
      this.text = "";
      this.nextSeq = 0;
      return;
    }
    const start = Math.min(...this.held.keys());
    let prefix = "";
    let best = 0;
    for (let s = start; this.held.has(s); s += 1) {
      prefix += this.held.get(s);
      if (this.base.endsWith(prefix)) best = s - start + 1;
    }
    if (!best) return;
    this.text = this.base;
    this.nextSeq = start + best;
    for (const s of [...this.held.keys()]) if (s < this.nextSeq) this.held.delete(s);
  }

  // A poll's answer for a reply still going: newer saved text, queue place.
  polled(data) {
    if (FINISHED.has(data.status)) { this.finalize(data); return; }
    this.status = data.status;
    this.queuePosition = data.queue_position;
    if (!this.anchored && data.content.length >= this.base.length) {
      this.base = data.content;
      if (this.held.size) { this.anchor(); this.drain(); }
    }
    this.render();
  }

  step(frame) {
    if (frame.phase === "queued") { this.queued(frame); return; }
    const { text, values } = switchText(frame);
    values.freed = this.fmt.bytes(frame.freed_bytes);
    values.owner = this.fmt.owner(frame.owner);
    const line = text ? interpolate(text, values, true) : `${String(frame.phase).replace(/_/g, " ")} ${values.model}`;
    // A step in progress ("unloading…") is replaced by its outcome when that
    // arrives, so the list reads as what happened, the current step last.
    const key = stepKey(frame);
    let li = [...this.steps.children].find((item) => item.dataset.key === key && item.classList.contains("active"));
    this.stepsEnd(li);
    if (!li) {
      li = el("li");
      li.dataset.key = key;
      this.steps.append(li);
    }
    li.textContent = line;
    li.classList.toggle("active", /^(un)?loading_/.test(frame.phase) || frame.phase === "waiting_for_ollama");
    this.render();
  }

  get queueNote() { return this.steps.querySelector("li[data-key='queued']"); }

  // The queue note stands until the GPU work for the reply begins (any
  // other step), its text does, or it ends. The dispatcher sends it after
  // queueing the task, so the worker's first frames can overtake it: a
  // note that comes after them is stale.
  queued(frame) {
    let li = this.queueNote;
    if (this.done || this.status !== "queued" || (!li && this.steps.children.length)) return;
    if (!li) {
      li = el("li", "active");
      li.dataset.key = "queued";
      this.steps.append(li);
    }
    li.textContent = queuedText(frame, kindOf(this.model));
    this.render();
  }

  // Steps still "in progress" when another begins (or the reply ends) are
  // over. One that asked Ollama to unload and heard of nothing unloaded
  // found nothing loaded: the GPU manager only reports unloads that freed
  // something (gpu_manager/manager.py).
  stepsEnd(except) {
    for (const li of this.steps.querySelectorAll("li.active")) {
      if (li === except) continue;
      if (li.dataset.key === "queued") { li.remove(); continue; }
      li.classList.remove("active");
      if (li.dataset.key.startsWith("ollama_unload:")) li.textContent = gettext("Ollama had nothing on the GPU");
      if (li.dataset.key === "waiting_for_ollama") li.textContent = gettext("Ollama's replies have finished");
    }
  }

  // `chat.sources`, before the reply's first delta; or a stored reply's.
  setSources(sources) {
    this.sources = Array.isArray(sources) ? sources : [];
    this.sourcesSlot.replaceChildren(...(this.sources.length ? [sourcesElement(this.id, this.sources)] : []));
    this.render();
  }

  stop() {
    this.stopping = true;
    this.render();
  }

  // chat.done / chat.error: final at once; the stored text and the figures
  // follow from finalize() when the page has read the message back.
  ended(frame) {
    if (this.done) return;
    this.done = true;
    this.drain();
    if (!this.anchored) this.text = this.base;
    if (frame.type === "chat.error") {
      this.status = "error";
      this.error.textContent = `${frame.code}: ${frame.detail}`;
    } else {
      this.status = frame.finish_reason === "cancelled" ? "cancelled" : "done";
      this.meta.textContent = this.figures({ finish_reason: frame.finish_reason, usage: frame.usage });
    }
    this.settle();
  }

  finalize(data) {
    this.done = true;
    this.status = data.status;
    this.text = data.content;
    this.error.textContent = data.status === "error" ? `${data.error_code}: ${data.error_detail}` : "";
    this.meta.textContent = this.figures(data);
    this.settle();
  }

  settle() {
    this.li.classList.remove("streaming");
    this.li.classList.toggle("failed", this.status === "error");
    this.li.removeAttribute("aria-busy");
    this.held.clear();
    this.stepsEnd(null);
    this.actions.hidden = false;
    this.copyButton.hidden = !this.text;
    this.translations.group.hidden = !this.text;
    this.render();
  }

  figures(data) {
    const parts = [];
    if (data.ttft_seconds != null) {
      parts.push(interpolate(gettext("first token %(s)s"), { s: seconds(data.ttft_seconds) }, true));
    }
    if (data.tokens_per_second != null) {
      parts.push(interpolate(gettext("%(rate)s tokens/s"), { rate: data.tokens_per_second.toFixed(1) }, true));
    }
    const tokens = data.usage && data.usage.completion_tokens;
    if (tokens) parts.push(interpolate(ngettext("%(n)s token", "%(n)s tokens", tokens), { n: tokens }, true));
    if (data.finish_reason === "cancelled") parts.push(gettext("stopped"));
    if (data.finish_reason === "length") parts.push(gettext("cut off at the length limit"));
    return parts.join(" · ");
  }

  placeholder() {
    if (this.stopping) return gettext("Stopping…");
    if (this.status === "queued") {
      if (this.queuePosition) {
        return interpolate(ngettext("Waiting in the queue: %(n)s request ahead",
          "Waiting in the queue: %(n)s requests ahead", this.queuePosition), { n: this.queuePosition }, true);
      }
      return gettext("Waiting in the queue…");
    }
    return this.steps.querySelector("li.active") ? gettext("Preparing the GPU…") : gettext("Writing…");
  }

  // Renders at most once per animation frame, however many deltas arrive.
  render() {
    if (this.renderQueued) return;
    this.renderQueued = true;
    requestAnimationFrame(() => {
      this.renderQueued = false;
      const text = this.done ? this.text : this.shown;
      this.li.classList.toggle("placeholder", !text && !this.done);
      this.li.classList.toggle("streaming", !this.done);
      if (text) {
        this.body.replaceChildren(renderMarkdown(text));
        citeMarks(this.body, this.id, this.sources);
      } else this.body.replaceChildren(this.done ? (this.status === "error" ? "" : gettext("(no output)"))
        : el("span", "msg-wait", this.placeholder()));
    });
  }
}
