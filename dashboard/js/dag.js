// A run's stages as a graph: laid out by dependency depth, drawn in SVG, updated in place.
import { h, s } from './dom.js';
import { formatDuration, statusLabel } from './format.js';

const NODE_W = 236;
const NODE_H = 74;
const PAD = 22;
const GAPS = { lr: { main: 64, cross: 22 }, tb: { main: 48, cross: 18 } };
const GLYPHS = {
  completed: ['M-5 0l3.5 3.5L5.5-4'],
  failed: ['M-4.5-4.5l9 9M4.5-4.5l-9 9'],
  in_progress: ['M0-6a6 6 0 1 1-6 6'],
  queued: ['M0-6a6 6 0 1 0 0 12a6 6 0 1 0 0-12', 'M0-3v3.5l2.5 1.5'],
  waiting: ['M-3-5v10M3-5v10'],
  pending: ['M-4 0h.01M0 0h.01M4 0h.01'],
  skipped: ['M-5 0h10'],
  cancelled: ['M-3.5-3.5h7v7h-7z'],
};
let graphCount = 0;

/** Depth of every stage: 0 without dependencies, else one more than its deepest dependency. */
export function stageDepths(stages) {
  const byId = new Map(stages.map((stage) => [stage.id, stage]));
  const depth = new Map();
  const visiting = new Set();
  const visit = (id) => {
    if (depth.has(id)) return depth.get(id);
    if (visiting.has(id)) return 0; // a cycle: still drawn, validation reports it
    visiting.add(id);
    const deps = (byId.get(id)?.dependencies || []).filter((dep) => dep !== id && byId.has(dep));
    const value = deps.length ? 1 + Math.max(...deps.map(visit)) : 0;
    visiting.delete(id);
    depth.set(id, value);
    return value;
  };
  for (const stage of stages) visit(stage.id);
  return depth;
}

/** Positions of nodes: columns (or rows) by depth, ordered to keep edges short. */
export function layoutDag(stages, orientation = 'lr') {
  const depths = stageDepths(stages);
  const levels = [];
  for (const stage of stages) {
    const d = depths.get(stage.id) || 0;
    (levels[d] ||= []).push(stage);
  }
  const order = new Map();
  levels.forEach((level, d) => {
    if (!level) {
      levels[d] = [];
      return;
    }
    if (d > 0) {
      const key = (stage) => {
        const parents = (stage.dependencies || []).filter((dep) => order.has(dep));
        return parents.length ? parents.reduce((sum, dep) => sum + order.get(dep), 0) / parents.length : 0;
      };
      level.sort((a, b) => key(a) - key(b));
    }
    level.forEach((stage, i) => order.set(stage.id, i));
  });
  const { main, cross } = GAPS[orientation];
  const widest = Math.max(1, ...levels.map((level) => level.length));
  const nodeMain = orientation === 'lr' ? NODE_W : NODE_H;
  const nodeCross = orientation === 'lr' ? NODE_H : NODE_W;
  const crossSize = widest * nodeCross + (widest - 1) * cross;
  const positions = new Map();
  levels.forEach((level, d) => {
    const span = level.length * nodeCross + (level.length - 1) * cross;
    const start = PAD + (crossSize - span) / 2;
    level.forEach((stage, i) => {
      const along = PAD + d * (nodeMain + main);
      const across = start + i * (nodeCross + cross);
      positions.set(stage.id, orientation === 'lr' ? { x: along, y: across } : { x: across, y: along });
    });
  });
  const mainSize = levels.length * nodeMain + Math.max(0, levels.length - 1) * main;
  const width = 2 * PAD + (orientation === 'lr' ? mainSize : crossSize);
  const height = 2 * PAD + (orientation === 'lr' ? crossSize : mainSize);
  return { positions, width, height, depths, levels: levels.length };
}

function edgePath(from, to, orientation) {
  if (orientation === 'lr') {
    const sx = from.x + NODE_W;
    const sy = from.y + NODE_H / 2;
    const ex = to.x - 6;
    const ey = to.y + NODE_H / 2;
    const dx = Math.max(30, (ex - sx) / 2);
    return `M${sx} ${sy} C${sx + dx} ${sy}, ${ex - dx} ${ey}, ${ex} ${ey}`;
  }
  const sx = from.x + NODE_W / 2;
  const sy = from.y + NODE_H;
  const ex = to.x + NODE_W / 2;
  const ey = to.y - 6;
  const dy = Math.max(24, (ey - sy) / 2);
  return `M${sx} ${sy} C${sx} ${sy + dy}, ${ex} ${ey - dy}, ${ex} ${ey}`;
}

function truncate(text, max) {
  const value = String(text ?? '');
  return value.length > max ? `${value.slice(0, max - 1)}…` : value;
}

function stageStatus(stage) {
  return stage.status || 'pending';
}

function detailLine(stage) {
  const status = stageStatus(stage);
  if (status === 'completed' || status === 'failed') return stage.agentId || statusLabel(status);
  // The run was cancelled while this stage ran: it ends when its agent answers.
  if (status === 'in_progress' && stage.runEnded) return 'Ending: run cancelled';
  if (status === 'in_progress') return stage.agentId || 'Running…';
  if (status === 'pending' && stage.dependencies?.length) {
    return `Waits for ${stage.dependencies.join(', ')}`;
  }
  return statusLabel(status);
}

function glyph(status) {
  return (GLYPHS[status] || GLYPHS.pending).map((d) => s('path', { d }));
}

/**
 * Draw `stages` ({id, name, agentCapability, dependencies, status, agentId, durationMs,
 * runEnded: the run has ended while the stage still runs}).
 * Returns {element, update(stages), select(id)}; `onSelect(id)` makes nodes buttons.
 */
export function renderDag(stages, { orientation = 'lr', onSelect, selectedId, label = 'Stage graph' } = {}) {
  const id = ++graphCount;
  const layout = layoutDag(stages, orientation);
  const { width, height, positions } = layout;
  const markers = ['idle', 'done', 'failed'].map((kind) =>
    s(
      'marker',
      {
        id: `arrow-${kind}-${id}`,
        viewBox: '0 0 10 10',
        refX: 6,
        refY: 5,
        markerWidth: 7,
        markerHeight: 7,
        orient: 'auto-start-reverse',
        class: `dag-marker dag-marker--${kind}`,
      },
      s('path', { d: 'M0 1L8 5L0 9z' }),
    ),
  );
  const edgeLayer = s('g', { class: 'dag-edges' });
  const nodeLayer = s('g', { class: 'dag-nodes' });
  const svg = s(
    'svg',
    {
      class: `dag-svg dag-svg--${orientation}`,
      viewBox: `0 0 ${width} ${height}`,
      width,
      height,
      role: 'group',
      'aria-label': label,
      style: { minWidth: `${Math.min(width, Math.round(width * 0.62))}px` },
    },
    s('defs', null, markers),
    edgeLayer,
    nodeLayer,
  );
  const edges = [];
  const nodes = new Map();
  const byId = new Map(stages.map((stage) => [stage.id, stage]));

  for (const stage of stages) {
    for (const dep of stage.dependencies || []) {
      if (!byId.has(dep) || dep === stage.id) continue;
      const path = s('path', {
        class: 'dag-edge',
        d: edgePath(positions.get(dep), positions.get(stage.id), orientation),
        'data-from': dep,
        'data-to': stage.id,
      });
      edgeLayer.append(path);
      edges.push({ from: dep, to: stage.id, path });
    }
  }

  const maxTitle = Math.floor((NODE_W - 62) / 7.6);
  const maxSub = Math.floor((NODE_W - 62) / 6.4);
  for (const stage of stages) {
    const { x, y } = positions.get(stage.id);
    const status = stageStatus(stage);
    const titleEl = s('title');
    // The glyph spins for running stages: a CSS transform would replace a transform attribute,
    // so position and animation live on different elements.
    const statusGlyph = s('g', { class: 'dag-node__glyph' });
    const detail = s('text', { class: 'dag-node__detail', x: 56, y: 59 });
    const timing = s('text', { class: 'dag-node__timing', x: NODE_W - 14, y: 59, 'text-anchor': 'end' });
    const node = s(
      'g',
      {
        class: 'dag-node',
        'data-stage-id': stage.id,
        'data-status': status,
        transform: `translate(${x} ${y})`,
        tabindex: onSelect ? '0' : null,
        role: onSelect ? 'button' : 'img',
        onClick: onSelect ? () => onSelect(stage.id) : null,
        onKeydown: onSelect
          ? (event) => {
              if (event.key === 'Enter' || event.key === ' ') {
                event.preventDefault();
                onSelect(stage.id);
              }
            }
          : null,
      },
      titleEl,
      s('rect', { class: 'dag-node__halo', x: -5, y: -5, width: NODE_W + 10, height: NODE_H + 10, rx: 17 }),
      s('rect', { class: 'dag-node__box', width: NODE_W, height: NODE_H, rx: 13 }),
      s('circle', { class: 'dag-node__badge', cx: 30, cy: NODE_H / 2, r: 15 }),
      s('g', { transform: `translate(30 ${NODE_H / 2})` }, statusGlyph),
      s('text', { class: 'dag-node__title', x: 56, y: 25 }, truncate(stage.name || stage.id, maxTitle)),
      s('text', { class: 'dag-node__capability', x: 56, y: 42 }, truncate(stage.agentCapability || '', maxSub)),
      detail,
      timing,
    );
    nodeLayer.append(node);
    nodes.set(stage.id, { node, titleEl, statusGlyph, detail, timing, status: null });
  }

  function paint(current) {
    const statusOf = new Map(current.map((stage) => [stage.id, stageStatus(stage)]));
    for (const stage of current) {
      const entry = nodes.get(stage.id);
      if (!entry) continue;
      const status = stageStatus(stage);
      const text = `${stage.name || stage.id} (${stage.id}): ${statusLabel(status)}`;
      entry.titleEl.textContent = `${text}${stage.agentCapability ? ` — needs ${stage.agentCapability}` : ''}`;
      entry.node.setAttribute('aria-label', `Stage ${text}`);
      const timing = stage.durationMs != null ? formatDuration(stage.durationMs) : '';
      entry.timing.textContent = timing;
      const room = NODE_W - 56 - 14 - (timing ? timing.length * 7 + 10 : 0);
      entry.detail.textContent = truncate(detailLine(stage), Math.floor(room / 7));
      if (entry.status !== status) {
        if (entry.status && (status === 'completed' || status === 'failed')) {
          entry.node.classList.remove('dag-node--flash');
          void entry.node.getBoundingClientRect();
          entry.node.classList.add('dag-node--flash');
        }
        entry.node.setAttribute('data-status', status);
        entry.statusGlyph.replaceChildren(...glyph(status));
        entry.status = status;
      }
    }
    for (const edge of edges) {
      const from = statusOf.get(edge.from);
      const to = statusOf.get(edge.to);
      let kind = 'idle';
      if (from === 'completed') kind = to === 'in_progress' || to === 'queued' || to === 'waiting' ? 'active' : 'done';
      if (from === 'failed' || to === 'skipped') kind = from === 'failed' ? 'failed' : 'idle';
      edge.path.setAttribute('class', `dag-edge dag-edge--${kind}`);
      const marker = kind === 'active' ? 'done' : kind;
      edge.path.setAttribute('marker-end', `url(#arrow-${marker}-${id})`);
    }
  }

  function select(stageId) {
    for (const [key, entry] of nodes) {
      entry.node.classList.toggle('is-selected', key === stageId);
      if (onSelect) entry.node.setAttribute('aria-pressed', key === stageId ? 'true' : 'false');
    }
  }

  paint(stages);
  if (selectedId) select(selectedId);
  const element = h('div', { class: 'dag', 'data-testid': 'dag' }, svg);
  return { element, update: paint, select, layout };
}

export function dagLegend() {
  return h(
    'ul',
    { class: 'dag-legend', 'aria-label': 'Legend' },
    ['pending', 'queued', 'waiting', 'in_progress', 'completed', 'failed', 'skipped', 'cancelled'].map((status) =>
      h('li', { class: `dag-legend__item dag-legend__item--${status}` }, h('span', { class: 'dag-legend__swatch' }), statusLabel(status)),
    ),
  );
}
