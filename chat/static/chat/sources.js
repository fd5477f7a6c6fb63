// The passages a knowledge-assisted reply was given (CONTRACT §8,
// `chat.sources`), numbered under the reply, and the reply's `[n]` citations
// of them turned into marks that lead to their source. Everything here is
// built from nodes and textContent: a passage or a reply is never HTML.
import { el } from "./util.js";

// A passage is a chunk of a few hundred tokens; under the reply it is a
// reminder of where the answer came from, not the passage itself.
const EXCERPT_CHARS = 220;
// `[1]`, and the full-width brackets a model writing Chinese may use (【1】).
const CITATION_RE = /[[【](\d{1,3})[\]】]/g;
// Citations are not looked for in code, nor in links (the label of a
// Markdown link is the model's own).
const SKIP = new Set(["CODE", "PRE", "A"]);
const HIGHLIGHT_MS = 2000;

function sourceId(messageId, n) { return `src-${messageId}-${n}`; }

function excerpt(text) {
  const flat = String(text ?? "").replace(/\s+/g, " ").trim();
  return flat.length > EXCERPT_CHARS ? `${flat.slice(0, EXCERPT_CHARS).trimEnd()}…` : flat;
}

function citationLabel(source) {
  return interpolate(gettext("Source %(n)s: %(document)s"), { n: source.n, document: source.document }, true);
}

// The numbered list; `sources` as the server sends them, best first.
export function sourcesElement(messageId, sources) {
  const section = el("section", "msg-sources");
  const heading = el("h3", "msg-sources-heading", gettext("Sources"));
  heading.id = `sources-${messageId}`;
  section.setAttribute("aria-labelledby", heading.id);
  const list = el("ol");
  for (const s of sources) {
    const li = el("li", "msg-source");
    li.id = sourceId(messageId, s.n);
    li.tabIndex = -1; // a citation moves focus here
    li.value = s.n;
    const head = el("p", "msg-source-head");
    head.append(el("span", "msg-source-n", `[${s.n}]`), " ", el("span", "msg-source-doc", s.document));
    if (typeof s.score === "number") {
      const score = el("span", "msg-source-score",
        interpolate(gettext("score %(score)s"), { score: s.score.toFixed(3) }, true));
      score.title = gettext("How well the passage matched the question");
      head.append(" ", score);
    }
    const text = el("p", "msg-source-text", excerpt(s.text));
    text.title = String(s.text ?? "");
    li.append(head, text);
    list.append(li);
  }
  section.append(heading, list);
  return section;
}

// Replaces each `[n]` in the rendered reply under `root` whose n is one of
// `sources` with a citation mark linking to that source; others stay text.
export function citeMarks(root, messageId, sources) {
  const byN = new Map(sources.map((s) => [Number(s.n), s]));
  if (!byN.size) return;
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
    acceptNode(node) {
      for (let p = node.parentNode; p && p !== root; p = p.parentNode) {
        if (SKIP.has(p.nodeName)) return NodeFilter.FILTER_REJECT;
      }
      // search, not test: test would leave the global regex's lastIndex
      // past the first match, and matchAll below starts from a copy of it.
      return node.data.search(CITATION_RE) !== -1 ? NodeFilter.FILTER_ACCEPT : NodeFilter.FILTER_REJECT;
    },
  });
  const nodes = [];
  while (walker.nextNode()) nodes.push(walker.currentNode);
  for (const node of nodes) {
    const parts = [];
    let last = 0;
    for (const m of node.data.matchAll(CITATION_RE)) {
      const source = byN.get(Number(m[1]));
      if (!source) continue;
      parts.push(node.data.slice(last, m.index), citation(messageId, source));
      last = m.index + m[0].length;
    }
    if (!parts.length) continue;
    parts.push(node.data.slice(last));
    node.replaceWith(...parts.filter((p) => p !== ""));
  }
}

function citation(messageId, source) {
  const a = el("a", "cite", String(source.n));
  a.href = `#${sourceId(messageId, source.n)}`;
  a.dataset.cite = String(source.n);
  a.setAttribute("aria-label", citationLabel(source));
  a.title = citationLabel(source);
  return a;
}

// A citation's click shows its source (scrolled to, focused, highlighted a
// moment) without following the link: a new URL fragment would be a
// history entry, and the page's history holds conversations (chat.js).
export function citationClicked(event) {
  const mark = event.target.closest("a.cite");
  if (!mark) return;
  event.preventDefault();
  const source = document.getElementById(mark.hash.slice(1));
  if (!source) return;
  source.classList.add("cited");
  source.scrollIntoView({ block: "nearest" });
  source.focus({ preventScroll: true });
  setTimeout(() => source.classList.remove("cited"), HIGHLIGHT_MS);
}
