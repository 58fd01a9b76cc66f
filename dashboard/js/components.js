// Small pieces every page uses: badges, states, JSON, pagination, toasts, dialogs, forms.
import { h, s, replace } from './dom.js';
import { icon } from './icons.js';
import { formatBytes, statusLabel } from './format.js';

// Highlighting makes an element per token, and a stage output may be up to 1 MB: hundreds
// of thousands of elements froze the run page for seconds. Longer JSON is shown as plain
// text, its first PREVIEW_CHARS only, with the whole of it a download away.
const HIGHLIGHT_MAX_CHARS = 50_000;
const PREVIEW_CHARS = 50_000;

export function badge(status, { large = false } = {}) {
  return h(
    'span',
    { class: ['badge', `badge--${status}`, large && 'badge--large'], 'data-status': status },
    h('span', { class: 'badge__dot', 'aria-hidden': 'true' }),
    statusLabel(status),
  );
}

export function pageHeader(title, { subtitle, actions, crumbs } = {}) {
  return h(
    'header',
    { class: 'page-header' },
    h(
      'div',
      { class: 'page-header__text' },
      crumbs ? h('nav', { class: 'crumbs', 'aria-label': 'Breadcrumb' }, crumbs) : null,
      h('h1', { class: 'page-title' }, title),
      subtitle ? h('p', { class: 'page-subtitle' }, subtitle) : null,
    ),
    actions ? h('div', { class: 'page-header__actions' }, actions) : null,
  );
}

export function card(title, body, { actions, className, id } = {}) {
  return h(
    'section',
    { class: ['card', className], id, 'aria-label': typeof title === 'string' ? title : null },
    title || actions
      ? h('div', { class: 'card__head' }, title ? h('h2', { class: 'card__title' }, title) : null, actions || null)
      : null,
    h('div', { class: 'card__body' }, body),
  );
}

export function loadingState(label = 'Loading…', rows = 3) {
  return h(
    'div',
    { class: 'state state--loading', role: 'status', 'aria-busy': 'true', 'data-state': 'loading' },
    h('span', { class: 'sr-only' }, label),
    Array.from({ length: rows }, (_, i) => h('div', { class: 'skeleton', style: { width: `${92 - i * 14}%` } })),
  );
}

export function emptyState({ title, text, action, iconName = 'inbox' }) {
  return h(
    'div',
    { class: 'state state--empty', 'data-state': 'empty' },
    h('div', { class: 'state__icon' }, icon(iconName, { size: 28 })),
    h('h3', { class: 'state__title' }, title),
    text ? h('p', { class: 'state__text' }, text) : null,
    action || null,
  );
}

export function errorState(error, onRetry) {
  return h(
    'div',
    { class: 'state state--error', role: 'alert', 'data-state': 'error' },
    h('div', { class: 'state__icon' }, icon('alert', { size: 28 })),
    h('h3', { class: 'state__title' }, 'Could not load this'),
    h('p', { class: 'state__text' }, error?.message || String(error)),
    error?.requestId ? h('p', { class: 'state__meta' }, `Request id ${error.requestId}`) : null,
    onRetry
      ? h('button', { class: 'btn btn--secondary', type: 'button', onClick: onRetry }, icon('refresh'), 'Try again')
      : null,
  );
}

export function alertBox(kind, message, { title, details } = {}) {
  return h(
    'div',
    { class: ['alert', `alert--${kind}`], role: kind === 'error' ? 'alert' : 'status' },
    icon(kind === 'success' ? 'check' : kind === 'info' ? 'sparkle' : 'alert'),
    h(
      'div',
      { class: 'alert__body' },
      title ? h('strong', { class: 'alert__title' }, title) : null,
      h('div', { class: 'alert__message' }, message),
      details && details.length
        ? h(
            'ul',
            { class: 'alert__details' },
            details.map((d) => h('li', null, d.field ? h('code', null, d.field) : null, d.field ? ' — ' : '', d.message)),
          )
        : null,
    ),
  );
}

/** Pretty-printed JSON (text nodes only): syntax-highlighted, or when longer than
 * HIGHLIGHT_MAX_CHARS its start as plain text, said so, with a button that downloads all
 * of it as `filename`. */
export function jsonView(value, { label, filename = 'data.json' } = {}) {
  const text = value === undefined ? 'null' : JSON.stringify(value, null, 2);
  if (text.length > HIGHLIGHT_MAX_CHARS) return largeJsonView(text, { label, filename });
  const pre = h('pre', { class: 'json', tabindex: '0', 'aria-label': label || 'JSON' });
  const token = /("(?:\\u[a-fA-F0-9]{4}|\\[^u]|[^\\"])*"(\s*:)?|\b(?:true|false)\b|\bnull\b|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g;
  let last = 0;
  for (const match of text.matchAll(token)) {
    if (match.index > last) pre.append(text.slice(last, match.index));
    const [piece] = match;
    let kind = 'number';
    if (piece.startsWith('"')) kind = match[2] ? 'key' : 'string';
    else if (piece === 'true' || piece === 'false') kind = 'boolean';
    else if (piece === 'null') kind = 'null';
    pre.append(h('span', { class: `json__${kind}` }, piece));
    last = match.index + piece.length;
  }
  pre.append(text.slice(last));
  return pre;
}

function largeJsonView(text, { label, filename }) {
  let end = Math.min(text.length, PREVIEW_CHARS);
  const last = text.charCodeAt(end - 1);
  if (last >= 0xd800 && last <= 0xdbff) end -= 1; // not half an emoji
  const preview = text.slice(0, end);
  const encoder = new TextEncoder();
  const shown = formatBytes(encoder.encode(preview).length);
  const total = formatBytes(encoder.encode(text).length);
  return h(
    'div',
    { class: 'json-large', 'data-testid': 'json-large' },
    h(
      'div',
      { class: 'json-large__note' },
      h('span', { 'data-testid': 'json-large-note' }, `Showing the first ${shown} of ${total} (too large to show whole).`),
      h(
        'button',
        { class: 'btn btn--secondary btn--small', type: 'button', onClick: () => downloadFile(text, filename, 'application/json') },
        icon('download', { size: 15 }),
        h('span', { class: 'btn__label' }, 'Download JSON'),
      ),
    ),
    h('pre', { class: 'json', tabindex: '0', 'aria-label': `${label || 'JSON'} (the first ${shown} of ${total})` }, `${preview}\n…`),
  );
}

/** Save `text` as a file: a link to a blob: URL, clicked. (A download is a navigation, not a
 * fetch: the site's Content-Security-Policy does not stand in its way.) */
export function downloadFile(text, filename, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = h('a', { href: url, download: filename, class: 'sr-only' });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export function copyButton(text, label = 'Copy') {
  const button = h(
    'button',
    {
      class: 'btn btn--ghost btn--small',
      type: 'button',
      title: label,
      onClick: async () => {
        try {
          await navigator.clipboard.writeText(typeof text === 'function' ? text() : text);
          toast('Copied to the clipboard', 'success');
        } catch {
          toast('Copying is not allowed here; select the text instead', 'warning');
        }
      },
    },
    icon('copy', { size: 15 }),
    h('span', { class: 'btn__label' }, label),
  );
  return button;
}

export function pagination(meta, onPage) {
  if (!meta || meta.pages <= 1) {
    return meta && meta.total
      ? h('p', { class: 'pagination__summary' }, `${meta.total} in total`)
      : null;
  }
  return h(
    'nav',
    { class: 'pagination', 'aria-label': 'Pagination' },
    h(
      'button',
      {
        class: 'btn btn--secondary btn--small',
        type: 'button',
        disabled: meta.page <= 1,
        onClick: () => onPage(meta.page - 1),
        'aria-label': 'Previous page',
      },
      icon('chevronLeft', { size: 16 }),
      'Previous',
    ),
    h('span', { class: 'pagination__summary', 'data-testid': 'page-info' }, `Page ${meta.page} of ${meta.pages} · ${meta.total} in total`),
    h(
      'button',
      {
        class: 'btn btn--secondary btn--small',
        type: 'button',
        disabled: meta.page >= meta.pages,
        onClick: () => onPage(meta.page + 1),
        'aria-label': 'Next page',
      },
      'Next',
      icon('chevronRight', { size: 16 }),
    ),
  );
}

export function toast(message, kind = 'info') {
  const host = document.getElementById('toasts');
  if (!host) return;
  const item = h(
    'div',
    { class: ['toast', `toast--${kind}`] },
    icon(kind === 'success' ? 'check' : kind === 'error' || kind === 'warning' ? 'alert' : 'sparkle', { size: 16 }),
    h('span', null, message),
  );
  host.append(item);
  setTimeout(() => item.classList.add('toast--leaving'), 3200);
  setTimeout(() => item.remove(), 3600);
}

/** A modal confirmation; resolves true when confirmed. When `signal` (the page's
 * `ctx.signal`) aborts, it closes unconfirmed: the page is gone, to another route or
 * because another tab signed out (or in as someone else), and nothing may act for it. */
export function confirmDialog({ title, message, confirmLabel = 'Confirm', cancelLabel = 'Cancel', danger = false, signal }) {
  return new Promise((resolve) => {
    if (signal?.aborted) {
      resolve(false);
      return;
    }
    const dialog = h(
      'dialog',
      { class: 'dialog', 'aria-labelledby': 'confirm-title' },
      h(
        'form',
        { method: 'dialog', class: 'dialog__form' },
        h('h2', { class: 'dialog__title', id: 'confirm-title' }, title),
        h('p', { class: 'dialog__text' }, message),
        h(
          'div',
          { class: 'dialog__actions' },
          h('button', { class: 'btn btn--secondary', value: 'cancel', type: 'submit' }, cancelLabel),
          h(
            'button',
            { class: ['btn', danger ? 'btn--danger' : 'btn--primary'], value: 'confirm', type: 'submit' },
            confirmLabel,
          ),
        ),
      ),
    );
    const dismiss = () => dialog.close();
    signal?.addEventListener('abort', dismiss, { once: true });
    dialog.addEventListener('close', () => {
      signal?.removeEventListener('abort', dismiss);
      resolve(dialog.returnValue === 'confirm');
      dialog.remove();
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}

export function field({ label, name, type = 'text', hint, attrs = {}, control }) {
  const id = `field-${name}`;
  const input =
    control ||
    h('input', { class: 'input', id, name, type, 'aria-describedby': hint ? `${id}-hint` : null, ...attrs });
  if (control) {
    control.id = control.id || id;
    control.name = control.name || name;
  }
  return h(
    'div',
    { class: 'field', 'data-field': name },
    h('label', { class: 'field__label', for: input.id }, label),
    input,
    hint ? h('p', { class: 'field__hint', id: `${id}-hint` }, hint) : null,
    h('p', { class: 'field__error', id: `${id}-error`, 'aria-live': 'polite' }),
  );
}

/** Put the API's `details: [{field, message}]` under the matching fields (the field named
 * by the whole path, e.g. `callback.url`, else by its first part); return the rest. */
export function showFieldErrors(form, details) {
  for (const el of form.querySelectorAll('.field')) {
    el.classList.remove('field--invalid');
    const message = el.querySelector('.field__error');
    if (message) message.textContent = '';
    el.querySelector('input, textarea, select')?.removeAttribute('aria-invalid');
  }
  const unplaced = [];
  for (const detail of details || []) {
    const path = String(detail.field || '');
    const at = (name) => form.querySelector(`.field[data-field="${CSS.escape(name)}"]`);
    const el = at(path) || at(path.split('.')[0]);
    if (!el) {
      unplaced.push(detail);
      continue;
    }
    el.classList.add('field--invalid');
    const control = el.querySelector('input, textarea, select');
    control?.setAttribute('aria-invalid', 'true');
    control?.setAttribute('aria-errormessage', `${control.id}-error`);
    const message = el.querySelector('.field__error');
    message.textContent = message.textContent ? `${message.textContent}; ${detail.message}` : detail.message;
  }
  const first = form.querySelector('.field--invalid input, .field--invalid textarea, .field--invalid select');
  first?.focus();
  return unplaced;
}

export function setBusy(button, busy, busyLabel) {
  if (busy) {
    button.savedChildren = [...button.childNodes];
    const label = busyLabel || button.textContent;
    button.disabled = true;
    button.setAttribute('aria-busy', 'true');
    replace(button, h('span', { class: 'spinner spinner--small', 'aria-hidden': 'true' }), label);
  } else {
    button.disabled = false;
    button.removeAttribute('aria-busy');
    if (button.savedChildren) replace(button, button.savedChildren);
  }
}

export function progressBar(progress, { label } = {}) {
  const total = progress?.total || 0;
  const completed = progress?.completed || 0;
  const failed = progress?.failed || 0;
  const pct = (n) => (total ? `${(100 * n) / total}%` : '0%');
  return h(
    'div',
    {
      class: 'progress',
      role: 'progressbar',
      'aria-valuemin': '0',
      'aria-valuemax': String(total),
      'aria-valuenow': String(completed),
      'aria-label': label || 'Stages completed',
    },
    h('div', { class: 'progress__fill progress__fill--completed', style: { width: pct(completed) } }),
    h('div', { class: 'progress__fill progress__fill--failed', style: { width: pct(failed) } }),
  );
}

export function liveDot(text = 'Live') {
  return h('span', { class: 'live', 'data-testid': 'live' }, h('span', { class: 'live__dot', 'aria-hidden': 'true' }), text);
}

export function sparkline(values) {
  const width = 80;
  const height = 24;
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`);
  return s(
    'svg',
    { class: 'sparkline', width, height, viewBox: `0 0 ${width} ${height}`, 'aria-hidden': 'true' },
    s('polyline', { points: points.join(' '), fill: 'none', stroke: 'currentColor', 'stroke-width': 2 }),
  );
}
