// A small Markdown subset rendered to DOM nodes, never to an HTML string: every piece of the
// text enters the page as a text node, so markup in a model's answer shows as text.
// Blocks: fenced code, headings, bullet and numbered lists, paragraphs. Inline: `code`,
// **bold**, *italic*. List markers stay in the text, so the words read as written.

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const LIST_ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const INLINE = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\s][^*\n]*\*)/;

function element(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function appendInline(parent, text) {
  text.split(INLINE).forEach((part, i) => {
    if (i % 2 === 0) {
      if (part) parent.append(document.createTextNode(part));
      return;
    }
    let node;
    if (part.startsWith("`")) {
      node = element("code");
      node.textContent = part.slice(1, -1);
    } else if (part.startsWith("**")) {
      node = element("strong");
      node.textContent = part.slice(2, -2);
    } else {
      node = element("em");
      node.textContent = part.slice(1, -1);
    }
    parent.append(node);
  });
}

function codeBlock(code, language) {
  const figure = element("figure", "code-block");
  if (language) {
    const caption = element("figcaption");
    caption.textContent = language;
    figure.append(caption);
  }
  const pre = element("pre");
  const codeNode = element("code");
  codeNode.textContent = code;
  pre.append(codeNode);
  figure.append(pre);
  return figure;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || LIST_ITEM.test(line);
}

function list(items) {
  const node = element("ul", "md-list");
  for (const { indent, marker, text } of items) {
    const item = element("li");
    item.style.setProperty("--indent", String(Math.min(indent, 8)));
    const mark = element("span", "marker");
    mark.textContent = /\d/.test(marker) ? marker : "\u2022";
    item.append(mark, document.createTextNode(" "));
    appendInline(item, text);
    node.append(item);
  }
  return node;
}

export function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      i += 1;
      // NOTE: while streaming the closing fence may not have arrived yet
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1;
      root.append(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      const node = element(`h${Math.min(heading[1].length + 2, 6)}`);
      appendInline(node, heading[2]);
      root.append(node);
      i += 1;
      continue;
    }
    if (LIST_ITEM.test(line)) {
      const items = [];
      let match;
      while (i < lines.length && (match = lines[i].match(LIST_ITEM))) {
        items.push({ indent: Math.floor(match[1].length / 2), marker: match[2], text: match[3] });
        i += 1;
      }
      root.append(list(items));
      continue;
    }
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const paragraph = element("p");
    let first = true;
    while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) {
      if (!first) paragraph.append(element("br"));
      appendInline(paragraph, lines[i]);
      first = false;
      i += 1;
    }
    root.append(paragraph);
  }
  return root;
}
