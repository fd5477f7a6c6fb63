// Code highlighting for fenced blocks in replies: one regular-expression
// scanner per language family that splits code into comments, strings,
// numbers, keywords, literals and called names, each a <span> whose text is
// set with textContent (the code is model output, never markup). Languages it
// does not know are shown plain. Small on purpose: it only has to make code
// in a chat readable, offline, with no third-party script to vet and pin.

const C_LIKE_LITERALS = "true false null nullptr NULL undefined nil this self super";
const SPECS = {
  python: {
    keywords: "and as assert async await break class continue def del elif else except finally for from global "
      + "if import in is lambda match case nonlocal not or pass raise return try while with yield print",
    literals: "True False None self cls",
    comment: ["#"], strings: ['"""', "'''", '"', "'"], prefix: "[rRbBfFuU]{0,2}",
  },
  js: {
    keywords: "async await break case catch class const continue debugger default delete do else export "
      + "extends finally for from function if import in instanceof let new of return static switch throw try "
      + "typeof var void while with yield interface type enum implements private public protected readonly as",
    literals: "true false null undefined this super NaN Infinity",
    comment: ["//"], block: ["/*", "*/"], strings: ["`", '"', "'"],
  },
  c: {
    keywords: "auto break case catch char class const constexpr continue default delete do double else enum "
      + "explicit extern final float for friend goto if inline int long namespace new operator override private "
      + "protected public register return short signed sizeof static struct switch template throw try typedef "
      + "typename union unsigned using virtual void volatile while bool abstract boolean byte extends implements "
      + "import instanceof interface package super synchronized throws var val fun when object data sealed "
      + "func go chan defer select map range fallthrough type struct impl fn let mut pub use mod crate match "
      + "loop move ref trait where dyn async await String Vec Option Some None Ok Err",
    literals: C_LIKE_LITERALS,
    comment: ["//"], block: ["/*", "*/"], strings: ['"', "'", "`"], directive: /#\s*\w+/y,
  },
  bash: {
    keywords: "if then else elif fi for while until do done case esac in function return local export "
      + "source alias unset shift exit set readonly declare echo cd sudo",
    literals: "true false",
    comment: ["#"], strings: ['"', "'"], variable: /\$\{?[\w@#?*!-]+\}?/y,
  },
  sql: {
    keywords: "select from where and or not insert into values update set delete create table index view drop "
      + "alter add column primary key foreign references join left right inner outer full on group by order "
      + "having limit offset as distinct union all exists in is like between case when then else end with "
      + "returning default constraint unique check begin commit rollback",
    literals: "null true false",
    comment: ["--"], block: ["/*", "*/"], strings: ["'", '"'], caseless: true,
  },
  json: { keywords: "", literals: "true false null", comment: [], strings: ['"'] },
  yaml: { keywords: "", literals: "true false null yes no on off ~", comment: ["#"], strings: ['"', "'"],
    key: /[\w.-]+(?=\s*:(?:\s|$))/y },
  xml: { keywords: "", literals: "", comment: [], block: ["<!--", "-->"], strings: ['"', "'"],
    tag: /<\/?[A-Za-z][\w:.-]*|\/?>/y },
  diff: { lines: true },
};
const ALIASES = {
  py: "python", python3: "python", ipython: "python", javascript: "js", jsx: "js", ts: "js", tsx: "js",
  typescript: "js", mjs: "js", node: "js", cpp: "c", "c++": "c", cc: "c", h: "c", hpp: "c", java: "c",
  cs: "c", csharp: "c", go: "c", golang: "c", rust: "c", rs: "c", kotlin: "c", kt: "c", swift: "c",
  scala: "c", php: "c", sh: "bash", shell: "bash", zsh: "bash", console: "bash", shellsession: "bash",
  postgres: "sql", postgresql: "sql", mysql: "sql", sqlite: "sql", yml: "yaml", toml: "yaml", ini: "yaml",
  html: "xml", svg: "xml", vue: "xml", patch: "diff",
};

const compiled = new Map();

function escapeRe(s) { return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"); }

function compile(name) {
  if (compiled.has(name)) return compiled.get(name);
  const spec = SPECS[name];
  const parts = [];
  if (spec.block) parts.push(["comment", `${escapeRe(spec.block[0])}[\\s\\S]*?(?:${escapeRe(spec.block[1])}|$)`]);
  for (const c of spec.comment) parts.push(["comment", `${escapeRe(c)}.*`]);
  for (const q of spec.strings) {
    const e = escapeRe(q);
    const prefix = spec.prefix || "";
    // Triple quotes and backticks span lines; other strings end at the line.
    const body = q.length === 3 || q === "`" ? `[\\s\\S]*?(?:${e}|$)` : `(?:\\\\.|(?!${e})[^\\\\\\n])*(?:${e}|$)`;
    parts.push(["string", `${prefix}${e}${body}`]);
  }
  for (const [cls, re] of [["meta", spec.directive], ["variable", spec.variable], ["attr", spec.key],
    ["tag", spec.tag]]) {
    if (re) parts.push([cls, re.source]);
  }
  parts.push(["number", "\\b(?:0[xX][\\da-fA-F_]+|\\d[\\d_]*(?:\\.\\d+)?(?:[eE][+-]?\\d+)?)\\b"]);
  parts.push(["word", "[A-Za-z_$][\\w$]*"]);
  const words = (s) => new Set((spec.caseless ? s.toLowerCase() : s).split(/\s+/).filter(Boolean));
  const result = {
    re: new RegExp(parts.map(([, src]) => `(${src})`).join("|"), "g"),
    classes: parts.map(([cls]) => cls),
    keywords: words(spec.keywords),
    literals: words(spec.literals),
    caseless: Boolean(spec.caseless),
  };
  compiled.set(name, result);
  return result;
}

function span(cls, text) {
  const node = document.createElement("span");
  node.className = `tok-${cls}`;
  node.textContent = text;
  return node;
}

function diffLines(code, fragment) {
  for (const line of code.split(/(?<=\n)/)) {
    const cls = line.startsWith("+") ? "added" : line.startsWith("-") ? "removed"
      : line.startsWith("@@") ? "meta" : "";
    fragment.append(cls ? span(cls, line) : line);
  }
  return fragment;
}

export function highlight(code, lang) {
  const fragment = document.createDocumentFragment();
  const name = String(lang || "").toLowerCase();
  const key = SPECS[name] ? name : ALIASES[name];
  if (!key) {
    fragment.append(code);
    return fragment;
  }
  if (SPECS[key].lines) return diffLines(code, fragment);
  const lexer = compile(key);
  lexer.re.lastIndex = 0;
  let last = 0;
  let m;
  while ((m = lexer.re.exec(code)) !== null) {
    if (m[0] === "") { lexer.re.lastIndex += 1; continue; }
    if (m.index > last) fragment.append(code.slice(last, m.index));
    const group = m.findIndex((g, k) => k > 0 && g !== undefined) - 1;
    let cls = lexer.classes[group];
    if (cls === "word") {
      const word = lexer.caseless ? m[0].toLowerCase() : m[0];
      cls = lexer.keywords.has(word) ? "keyword" : lexer.literals.has(word) ? "literal"
        : /^\s*\(/.test(code.slice(lexer.re.lastIndex, lexer.re.lastIndex + 8)) ? "call" : "";
    }
    fragment.append(cls ? span(cls, m[0]) : m[0]);
    last = lexer.re.lastIndex;
  }
  if (last < code.length) fragment.append(code.slice(last));
  return fragment;
}
