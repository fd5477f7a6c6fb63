// A small Markdown renderer for model output that builds DOM nodes and sets
// text only through textContent: no HTML string is ever parsed, so `<img
// onerror>` or `<script>` in a reply shows as the characters it is. Links
// keep an http(s) or mailto target or become plain text; images are shown as
// links (a reply must not make the browser fetch anything).
//
// Covers what chat models write: paragraphs with line breaks, ATX headings,
// fenced code (also still open while it streams), block quotes, nested
// lists, GFM tables, rules, and inline code, emphasis, strikethrough, links
// and bare URLs. It re-renders the whole reply on every frame, so it keeps no
// state between calls.
//
// Fenced code is highlighted by highlight.js, vendored and pinned under
// vendor/highlight/ (`make vendor-js`), with one grammar per language; a
// language it does not know, or no language, is shown plain.
import hljs from "./vendor/highlight/core.min.js";
import bash from "./vendor/highlight/languages/bash.min.js";
import c from "./vendor/highlight/languages/c.min.js";
import cpp from "./vendor/highlight/languages/cpp.min.js";
import csharp from "./vendor/highlight/languages/csharp.min.js";
import css from "./vendor/highlight/languages/css.min.js";
import diff from "./vendor/highlight/languages/diff.min.js";
import go from "./vendor/highlight/languages/go.min.js";
import ini from "./vendor/highlight/languages/ini.min.js";
import java from "./vendor/highlight/languages/java.min.js";
import javascript from "./vendor/highlight/languages/javascript.min.js";
import json from "./vendor/highlight/languages/json.min.js";
import kotlin from "./vendor/highlight/languages/kotlin.min.js";
import markdown from "./vendor/highlight/languages/markdown.min.js";
import php from "./vendor/highlight/languages/php.min.js";
import python from "./vendor/highlight/languages/python.min.js";
import rust from "./vendor/highlight/languages/rust.min.js";
import scala from "./vendor/highlight/languages/scala.min.js";
import shell from "./vendor/highlight/languages/shell.min.js";
import sql from "./vendor/highlight/languages/sql.min.js";
import swift from "./vendor/highlight/languages/swift.min.js";
import typescript from "./vendor/highlight/languages/typescript.min.js";
import xml from "./vendor/highlight/languages/xml.min.js";
import yaml from "./vendor/highlight/languages/yaml.min.js";

// The same list as HLJS_LANGUAGES in the Makefile. Each grammar brings its
// own aliases (py, js, ts, sh, golang, rs, c++, html, yml, toml, patch…).
for (const [name, grammar] of Object.entries({
  bash, c, cpp, csharp, css, diff, go, ini, java, javascript, json, kotlin, markdown, php, python, rust,
  scala, shell, sql, swift, typescript, xml, yaml,
})) {
  hljs.registerLanguage(name, grammar);
}

// Nesting deeper than this (quotes in lists in quotes…) is shown flat: a
// reply must not be able to recurse the renderer into the ground.
const MAX_DEPTH = 8;
// How far an emphasis or link looks for its closing mark; unmatched marks
// would otherwise make rendering quadratic in the reply's length.
const INLINE_WINDOW = 1000;
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

// \x60 is the backtick, spelled out so that xgettext (makemessages) does not
// take it for the start of a template string.
const FENCE_RE = /^ {0,3}(\x60{3,}|~{3,})[ \t]*([^\s\x60]*)[^\x60]*$/;
const HEADING_RE = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE_RE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE_RE = /^ {0,3}> ?/;
const ITEM_RE = /^( *)([-*+]|\d{1,9}[.)])([ \t]+|$)(.*)$/;
const TABLE_SEP_RE = /^ *\|? *:?-+:? *(\| *:?-+:? *)*\|? *$/;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  // The final newline ends the last line; it is not an empty line of its own
  // (it would show in a code fence that is still streaming).
  blocks(String(source).replace(/\r\n?/g, "\n").replace(/\n$/, "").split("\n"), fragment, 0);
  return fragment;
}

function startsBlock(line) {
  return FENCE_RE.test(line) || HEADING_RE.test(line) || RULE_RE.test(line) || QUOTE_RE.test(line)
    || ITEM_RE.test(line) && ITEM_RE.exec(line)[1].length < 4;
}

function blocks(lines, parent, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i += 1; continue; }
    if ((m = FENCE_RE.exec(line))) {
      const close = new RegExp("^ {0,3}" + (m[1][0] === "~" ? "~" : "\\x60") + "{" + m[1].length + ",}[ \\t]*$");
      const body = [];
      for (i += 1; i < lines.length && !close.test(lines[i]); i += 1) body.push(lines[i]);
      i += 1; // the closing fence; a fence still streaming runs to the end
      parent.append(codeBlock(body.join("\n"), m[2]));
    } else if ((m = HEADING_RE.exec(line))) {
      const heading = el(`h${Math.min(6, m[1].length + 2)}`, "md-h");
      inline(m[2] || "", heading);
      parent.append(heading);
      i += 1;
    } else if (RULE_RE.test(line)) {
      parent.append(el("hr"));
      i += 1;
    } else if (depth < MAX_DEPTH && QUOTE_RE.test(line)) {
      const inner = [];
      for (; i < lines.length && QUOTE_RE.test(lines[i]); i += 1) inner.push(lines[i].replace(QUOTE_RE, ""));
      const quote = el("blockquote");
      blocks(inner, quote, depth + 1);
      parent.append(quote);
    } else if (depth < MAX_DEPTH && (m = ITEM_RE.exec(line)) && m[1].length < 4) {
      i = list(lines, i, parent, depth);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP_RE.test(lines[i + 1])
               && lines[i + 1].includes("|")) {
      i = table(lines, i, parent);
    } else {
      const text = [line.trim()];
      for (i += 1; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i += 1) text.push(lines[i].trim());
      const p = el("p");
      inline(text.join("\n"), p);
      parent.append(p);
    }
  }
}

// Lists: an item owns every following line indented deeper than its marker
// (dedented by the marker's width, which is what nested lists need whether
// the model indents by 2, 3 or 4), lazy continuation lines, and blank lines
// inside it. Models are loose about indentation, so this is too.
function list(lines, start, parent, depth) {
  const first = ITEM_RE.exec(lines[start]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let i = start;
  while (i < lines.length) {
    const m = ITEM_RE.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const width = indent + m[2].length + Math.max(1, Math.min(4, m[3].length));
    const body = [m[4]];
    for (i += 1; i < lines.length; i += 1) {
      const line = lines[i];
      const lead = line.length - line.trimStart().length;
      if (!line.trim()) {
        // A blank line ends the item unless the item goes on after it.
        const next = lines.slice(i + 1).find((l) => l.trim());
        if (next === undefined || next.length - next.trimStart().length <= indent) break;
        body.push("");
      } else if (lead > indent) {
        body.push(line.slice(Math.min(lead, width)));
      } else if (!startsBlock(line) && body[body.length - 1] !== "") {
        body.push(line.trim()); // lazy continuation of the item's paragraph
      } else {
        break;
      }
    }
    const item = el("li");
    blocks(body, item, depth + 1);
    node.append(item);
    while (i < lines.length && !lines[i].trim()) {
      const next = lines.slice(i).find((l) => l.trim());
      const nm = next && ITEM_RE.exec(next);
      if (!nm || nm[1].length !== indent) break;
      i += 1; // blank lines between items of one list
    }
  }
  parent.append(node);
  return i;
}

function cells(row) {
  let text = row.trim();
  if (text.startsWith("|")) text = text.slice(1);
  if (text.endsWith("|") && !text.endsWith("\\|")) text = text.slice(0, -1);
  return text.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function table(lines, start, parent) {
  const head = cells(lines[start]);
  const aligns = cells(lines[start + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : c.startsWith(":") ? "left" : "");
  const tableEl = el("table");
  const row = (values, tag) => {
    const tr = el("tr");
    head.forEach((_, k) => {
      const cell = el(tag);
      if (aligns[k]) cell.style.textAlign = aligns[k];
      inline(values[k] || "", cell);
      tr.append(cell);
    });
    return tr;
  };
  tableEl.append(el("thead"));
  tableEl.tHead.append(row(head, "th"));
  const body = el("tbody");
  let i = start + 2;
  for (; i < lines.length && lines[i].trim() && lines[i].includes("|"); i += 1) body.append(row(cells(lines[i]), "td"));
  tableEl.append(body);
  const wrap = el("div", "md-table");
  wrap.append(tableEl);
  parent.append(wrap);
  return i;
}

// highlight.js returns the code as HTML in which every character of the code
// is escaped and only <span class="hljs-…"> elements are added. That HTML is
// parsed in an inert document (DOMParser runs no script and loads nothing),
// and only the spans, their hljs class names and the text are carried into
// the page: even a highlighter bug could not put markup from a reply there.
const HLJS_CLASS_RE = /^(?:hljs-[\w-]+|language-[\w-]+|\w+_)$/;

function highlight(code, lang) {
  const fragment = document.createDocumentFragment();
  const name = String(lang || "").toLowerCase();
  let html = null;
  if (name && hljs.getLanguage(name)) {
    try {
      html = hljs.highlight(code, { language: name, ignoreIllegals: true }).value;
    } catch {
      html = null; // a grammar that throws: the code is still shown, plain
    }
  }
  if (html === null) {
    fragment.append(code);
    return fragment;
  }
  // In a <div>, unlike at the start of <body> or in a <pre>, leading
  // newlines and spaces are kept.
  const doc = new DOMParser().parseFromString(`<!doctype html><body><div>${html}</div>`, "text/html");
  copySpans(doc.body.firstChild, fragment);
  return fragment;
}

function copySpans(from, to) {
  for (const node of from.childNodes) {
    if (node.nodeType === Node.TEXT_NODE) {
      to.append(node.data);
    } else if (node.nodeName === "SPAN") {
      const span = document.createElement("span");
      const classes = (node.getAttribute("class") || "").split(/\s+/).filter((c) => HLJS_CLASS_RE.test(c));
      if (classes.length) span.className = classes.join(" ");
      copySpans(node, span);
      to.append(span);
    } else {
      to.append(node.textContent); // not something highlight.js makes: its text only
    }
  }
}

function codeBlock(code, lang) {
  const figure = el("div", "md-code");
  const bar = el("div", "md-code-bar");
  bar.append(el("span", "md-code-lang", lang || ""));
  const copy = el("button", "md-code-copy", gettext("Copy code"));
  copy.type = "button";
  copy.dataset.copy = "code";
  bar.append(copy);
  const pre = el("pre");
  const codeEl = el("code");
  if (lang) codeEl.dataset.lang = lang;
  codeEl.append(highlight(code, lang));
  pre.append(codeEl);
  figure.append(bar, pre);
  return figure;
}

// ---- inline ----------------------------------------------------------------

function safeHref(url) {
  try {
    const parsed = new URL(url, location.href);
    return SAFE_PROTOCOLS.has(parsed.protocol) ? parsed.href : null;
  } catch {
    return null;
  }
}

function link(parent, label, url, isImage) {
  const href = safeHref(url);
  if (!href) {
    parent.append(label || url); // the text survives, the target does not
    return;
  }
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  if (isImage) a.className = "md-image-link";
  if (label) inline(label, a, true); else a.textContent = url;
  parent.append(a);
}

// Closing mark for an emphasis opened at `from`: not preceded by a space and,
// for a single `*`/`_`, not half of a double one.
function closing(text, mark, from) {
  const end = Math.min(text.length, from + INLINE_WINDOW);
  for (let k = text.indexOf(mark, from); k !== -1 && k < end; k = text.indexOf(mark, k + 1)) {
    if (/\s/.test(text[k - 1])) continue;
    if (mark.length === 1 && (text[k + 1] === mark || text[k - 1] === mark)) continue;
    if (mark === "_" && /\w/.test(text[k + 1] || "")) continue; // snake_case is not emphasis
    return k;
  }
  return -1;
}

// `[label](url)` starting at `at` (the "["): [labelEnd, urlStart, end] or null.
function linkAt(text, at) {
  let depthB = 0;
  const limit = Math.min(text.length, at + INLINE_WINDOW);
  let k = at;
  for (; k < limit; k += 1) {
    if (text[k] === "\\") { k += 1; continue; }
    if (text[k] === "[") depthB += 1;
    else if (text[k] === "]" && --depthB === 0) break;
  }
  if (k >= limit || text[k + 1] !== "(") return null;
  let depthP = 0;
  for (let j = k + 1; j < limit; j += 1) {
    if (text[j] === "\n") return null;
    if (text[j] === "(") depthP += 1;
    else if (text[j] === ")" && --depthP === 0) return [k, k + 2, j];
  }
  return null;
}

const URL_RE = /^https?:\/\/[^\s<>"]+/;

function inline(text, parent, inLink = false) {
  let buffer = "";
  const flush = () => { if (buffer) { parent.append(buffer); buffer = ""; } };
  let i = 0;
  while (i < text.length) {
    const ch = text[i];
    if (ch === "\\" && /[!-\/:-@[-\x60{-~]/.test(text[i + 1] || "")) {
      buffer += text[i + 1];
      i += 2;
      continue;
    }
    if (ch === "\n") {
      flush();
      parent.append(el("br"));
      i += 1;
      continue;
    }
    if (ch === "\x60") {
      const run = /^\x60+/.exec(text.slice(i, i + 32))[0];
      const end = text.indexOf(run, i + run.length);
      if (end !== -1 && end - i < INLINE_WINDOW * 4 && text[end + run.length] !== "\x60") {
        flush();
        parent.append(el("code", "md-inline-code", text.slice(i + run.length, end).replace(/^ (.+) $/, "$1")));
        i = end + run.length;
      } else {
        buffer += run;
        i += run.length;
      }
      continue;
    }
    const two = text.slice(i, i + 2);
    const mark = two === "**" || two === "__" || two === "~~" ? two : ch === "*" || ch === "_" ? ch : "";
    const opensWord = mark && text[i + mark.length] && !/\s/.test(text[i + mark.length])
      && !(mark[0] === "_" && /\w/.test(text[i - 1] || ""));
    if (opensWord) {
      const end = closing(text, mark, i + mark.length + 1);
      if (end !== -1) {
        flush();
        const node = el(mark === "~~" ? "del" : mark.length === 2 ? "strong" : "em");
        inline(text.slice(i + mark.length, end), node, inLink);
        parent.append(node);
        i = end + mark.length;
        continue;
      }
    }
    const image = ch === "!" && text[i + 1] === "[";
    if (!inLink && (ch === "[" || image)) {
      const found = linkAt(text, image ? i + 1 : i);
      if (found) {
        const [labelEnd, urlStart, end] = found;
        const label = text.slice(image ? i + 2 : i + 1, labelEnd);
        const url = text.slice(urlStart, end).trim().replace(/^<(.*)>$/, "$1").split(/\s+"/)[0];
        flush();
        link(parent, label, url, image);
        i = end + 1;
        continue;
      }
    }
    if (!inLink && ch === "<") {
      const auto = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/.exec(text.slice(i, i + INLINE_WINDOW));
      if (auto) {
        flush();
        link(parent, "", auto[1], false);
        i += auto[0].length;
        continue;
      }
    }
    if (!inLink && ch === "h" && !/\w/.test(text[i - 1] || "")) {
      const bare = URL_RE.exec(text.slice(i, i + INLINE_WINDOW));
      if (bare) {
        const url = bare[0].replace(/[.,;:!?)'\]]+$/, "");
        flush();
        link(parent, "", url, false);
        i += url.length;
        continue;
      }
    }
    buffer += ch;
    i += 1;
  }
  flush();
}
