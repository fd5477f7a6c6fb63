// The GPU panel: who owns the GPU, what is resident, who waits for it,
// memory, the last switch and recent transitions, from GET /api/gpu/
// (CONTRACT §5). It refreshes on every gpu.switch frame of this user's
// messages (the "owner" frame is shown before the refresh returns) and polls
// for everyone else's switches.
import { el, getJSON, humanBytes, seconds } from "./util.js";

const POLL_MS = 3000;
const EVENTS_SHOWN = 6;

export function ownerLabel(owner) {
  return {
    local: gettext("local models"), ollama: "Ollama", openai: gettext("OpenAI-compatible"),
    none: gettext("nobody"),
  }[owner] || owner;
}

export function eventText(e) {
  const model = e.model || "";
  switch (e.kind) {
    case "local_unload":
      return interpolate(e.warm ? gettext("Moved %(model)s to host memory: freed %(freed)s in %(s)s")
        : gettext("Unloaded %(model)s: freed %(freed)s in %(s)s"),
      { model, freed: humanBytes(e.freed_bytes), s: seconds(e.seconds) }, true);
    case "ollama_unload":
      return interpolate(gettext("Ollama unloaded %(model)s: freed %(freed)s in %(s)s"),
        { model, freed: humanBytes(e.freed_bytes), s: seconds(e.seconds) }, true);
    case "local_load":
      return interpolate(e.warm ? gettext("Moved %(model)s back to the GPU in %(s)s")
        : gettext("Loaded %(model)s in %(s)s"), { model, s: seconds(e.seconds) }, true);
    case "ollama_unreachable":
      return interpolate(gettext("Ollama at %(endpoint)s did not answer"), { endpoint: e.endpoint || "" }, true);
    case "owner_change":
      return interpolate(gettext("GPU handed to %(owner)s"), { owner: ownerLabel(e.model) }, true);
    default:
      return `${e.kind} ${model}`;
  }
}

// One line for a slot's scheduler (Scheduler.snapshot, gpu_manager/
// scheduler.py): who waits, the gate of the current owner's visit, and what
// a switch costs, e.g. "waiting: local 3, Ollama 1 · gate closes in 4 s ·
// switch ≈ 1.20 s".
function schedulerText(sched) {
  const names = { local: gettext("local"), ollama: "Ollama", openai: "OpenAI" };
  const waiting = Object.entries(sched.waiting || {}).filter(([, n]) => n > 0)
    .map(([owner, n]) => `${names[owner] || owner} ${n}`);
  const parts = [waiting.length ? interpolate(gettext("waiting: %(list)s"), { list: waiting.join(", ") }, true)
    : gettext("nobody waiting")];
  const gate = sched.gate || {};
  if (gate.handover) parts.push(gettext("handing over"));
  else if (gate.closed) parts.push(gettext("gate closed"));
  else if (gate.closes_in_seconds != null) {
    parts.push(interpolate(gettext("gate closes in %(s)s s"), { s: Math.ceil(gate.closes_in_seconds) }, true));
  }
  if (sched.switch_seconds) {
    parts.push(interpolate(gettext("switch ≈ %(s)s"), { s: seconds(sched.switch_seconds) }, true));
  }
  if (sched.policy === "fifo") parts.push(gettext("arrival order"));
  return parts.join(" · ");
}

function timeOf(at) {
  return new Date(at * 1000).toLocaleTimeString(document.documentElement.lang, { hour12: false });
}

export class GpuPanel {
  constructor({ url, root, chip }) {
    this.url = url;
    this.root = root;
    this.chip = chip;
    this.inFlight = false;
    this.again = false;
    this.slots = root.querySelector("[data-gpu-slots]");
    this.events = root.querySelector("[data-gpu-events]");
  }

  start() {
    this.refresh();
    setInterval(() => { if (!document.hidden) this.refresh(); }, POLL_MS);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) this.refresh(); });
  }

  // One request at a time; one asked for meanwhile runs when it returns,
  // since the answer in flight may predate the switch that asked.
  async refresh() {
    if (this.inFlight) { this.again = true; return; }
    this.inFlight = true;
    try {
      this.render(await getJSON(this.url));
    } catch (err) {
      this.root.dataset.state = "error";
      this.setChip(gettext("unavailable"));
    } finally {
      this.inFlight = false;
      if (this.again) { this.again = false; this.refresh(); }
    }
  }

  // A gpu.switch frame: the owner change is known before the API says so.
  onSwitch(frame) {
    if (frame.phase === "owner" && frame.owner) {
      const owner = this.slots.querySelector("[data-owner]");
      if (owner) owner.textContent = ownerLabel(frame.owner);
      this.setChip(ownerLabel(frame.owner));
    }
    this.refresh();
  }

  setChip(text) {
    this.chip.textContent = interpolate(gettext("GPU: %(owner)s"), { owner: text }, true);
  }

  render(data) {
    delete this.root.dataset.state;
    const slots = data.slots || [];
    this.slots.replaceChildren(...(slots.length ? slots.map((s) => this.slot(s, slots.length > 1))
      : [el("p", "muted", gettext("No GPU worker has reported yet."))]));
    // The chip names who holds a GPU; idle slots only matter in the panel.
    const owners = [...new Set(slots.map((s) => s.owner).filter((o) => o !== "none"))];
    this.setChip(slots.length ? (owners.length ? owners : ["none"]).map(ownerLabel).join(" · ") : "—");
    const events = (data.events || []).slice(-EVENTS_SHOWN).reverse();
    this.events.replaceChildren(...events.map((e) => {
      const li = el("li");
      const time = el("time", "muted", timeOf(e.at));
      time.dateTime = new Date(e.at * 1000).toISOString();
      li.append(time, " ", eventText(e));
      return li;
    }));
    if (!events.length) this.events.append(el("li", "muted", gettext("No switches yet.")));
  }

  slot(s, named) {
    const box = el("section", "gpu-slot");
    box.dataset.slot = s.slot;
    box.dataset.ownerKind = s.owner;
    if (named) box.append(el("h3", "", interpolate(gettext("Slot %(slot)s"), { slot: s.slot }, true)));
    const facts = el("dl", "gpu-facts");
    const resident = [...(s.local_models || []), ...(s.ollama_models || []).map((t) => `ollama_${t}`)];
    const mem = s.memory || {};
    const rows = [
      [gettext("Owner"), ownerLabel(s.owner), "owner"],
      [gettext("Resident"), resident.length ? resident.join(", ") : gettext("none"), "resident"],
      [gettext("Device"), mem.device || "—", "device"],
    ];
    if (s.scheduler) rows.push([gettext("Queue"), schedulerText(s.scheduler), "queue"]);
    for (const [label, value, key] of rows) {
      const dd = el("dd", "", value);
      dd.dataset[key] = "";
      facts.append(el("dt", "", label), dd);
    }
    box.append(facts, this.memory(mem));
    return box;
  }

  // One bar in three parts: what this GPU worker holds (allocated, then the
  // allocator's cache on CUDA), what other processes hold (Ollama, other
  // programs: total − free − ours), and what is free.
  memory(mem) {
    const wrap = el("div", "gpu-memory");
    wrap.append(el("h3", "", gettext("Memory")));
    if (!mem.total) {
      wrap.append(el("p", "muted", mem.allocated ? humanBytes(mem.allocated) : gettext("no reading yet")));
      return wrap;
    }
    const ours = Math.max(mem.allocated || 0, 0);
    const cache = Math.max((mem.reserved || 0) - ours, 0);
    const free = Math.max(mem.free || 0, 0);
    const others = Math.max(mem.total - free - ours - cache, 0);
    const bar = el("div", "bar");
    bar.setAttribute("aria-hidden", "true"); // the legend below says the same in words
    const parts = [["ours", ours], ["cache", cache], ["others", others]];
    for (const [cls, bytes] of parts) {
      const part = el("div", `bar-part bar-${cls}`);
      part.style.width = `${((bytes / mem.total) * 100).toFixed(2)}%`;
      bar.append(part);
    }
    const legend = el("ul", "gpu-legend");
    const labels = { ours: gettext("this worker"), cache: gettext("allocator cache"), others: gettext("other processes") };
    for (const [cls, bytes] of parts) {
      if (cls === "cache" && !bytes) continue;
      const li = el("li");
      li.append(el("span", `swatch bar-${cls}`), `${labels[cls]} ${humanBytes(bytes)}`);
      legend.append(li);
    }
    const freeLi = el("li");
    freeLi.append(el("span", "swatch bar-free"), interpolate(gettext("free %(free)s of %(total)s"),
      { free: humanBytes(free), total: humanBytes(mem.total) }, true));
    legend.append(freeLi);
    wrap.append(bar, legend);
    return wrap;
  }
}
