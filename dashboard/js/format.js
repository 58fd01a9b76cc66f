// Times, durations, status names and lengths of text as people read them.

export const STATUS_LABELS = {
  pending: 'Pending',
  queued: 'Queued',
  waiting: 'Waiting for an agent',
  in_progress: 'In progress',
  completed: 'Completed',
  failed: 'Failed',
  skipped: 'Skipped',
  cancelled: 'Cancelled',
  online: 'Online',
  degraded: 'Degraded',
  offline: 'Offline',
};

// A run or stage that may still change by itself. A cancelled run is not: it has ended
// (a stage that was running when it was cancelled ends on its own, its output discarded).
export const LIVE_STATUSES = new Set(['queued', 'waiting', 'in_progress']);

/** The statuses a run can have (the runs list's filters, the overview's counts). */
export const RUN_STATUSES = ['queued', 'in_progress', 'completed', 'failed', 'cancelled'];

export function statusLabel(status) {
  return STATUS_LABELS[status] || String(status || 'Unknown');
}

export function parseTime(value) {
  if (!value) return null;
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? null : date;
}

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: 'medium' });

export function formatDateTime(value) {
  const date = parseTime(value);
  return date ? dateTime.format(date) : '—';
}

export function formatClock(value) {
  const date = parseTime(value);
  return date ? timeOnly.format(date) : '—';
}

export function timeAgo(value, now = Date.now()) {
  const date = parseTime(value);
  if (!date) return 'never';
  const seconds = Math.round((now - date.getTime()) / 1000);
  if (seconds < 5) return 'just now';
  if (seconds < 60) return `${seconds} s ago`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.round(minutes / 60);
  if (hours < 48) return `${hours} h ago`;
  return `${Math.round(hours / 24)} d ago`;
}

export function formatDuration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '—';
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const seconds = ms / 1000;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

/** How long until `value`: `in 42 s`, or `passed`. */
export function timeUntil(value, now = Date.now()) {
  const date = parseTime(value);
  if (!date) return '';
  const ms = date.getTime() - now;
  return ms > 0 ? `in ${formatDuration(Math.ceil(ms / 1000) * 1000)}` : 'passed';
}

export function durationBetween(start, end) {
  const a = parseTime(start);
  const b = parseTime(end);
  return a && b ? b.getTime() - a.getTime() : null;
}

export function shortHash(hash, size = 10) {
  if (!hash) return '—';
  return hash.length > size * 2 ? `${hash.slice(0, size)}…${hash.slice(-4)}` : hash;
}

/** The characters in `text` as the API counts them: code points (Python's len()). Not
 * `text.length`, nor an input's maxlength: they count UTF-16 units, two for an emoji. */
export function characterCount(text) {
  return [...text].length;
}

/** A size in bytes as people read it: `512 B`, `48 KB`, `1.2 MB`. */
export function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${Math.round(bytes / 1024)} KB`;
  return `${(bytes / (1024 * 1024)).toFixed(1)} MB`;
}

export function percent(part, whole) {
  if (!whole) return '—';
  const value = (100 * part) / whole;
  return `${value < 10 && value > 0 ? value.toFixed(1) : Math.round(value)}%`;
}
