/**
 * The Djinn sidebar: the daemon's GPU, models and sessions (from the server extension) and the current
 * notebook's breakpoints, pause and controls (through that notebook's kernel). It renders what it is told and
 * holds no debugger logic; it polls only while visible (lumino Poll, standby when hidden, backoff on errors).
 */
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Poll } from '@lumino/polling';
import { Widget } from '@lumino/widgets';

import { IKernelState, KernelLink } from './kernel';
import { fetchStatus, ISessionRow, IStatus } from './status';

const ACTIONS = ['continue', 'step', 'finish', 'cancel'] as const;

type Child = Node | string | null | undefined | false;

function h(tag: string, attrs: Record<string, string> = {}, ...children: Child[]): HTMLElement {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child) {
      node.append(child);
    }
  }
  return node;
}

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) {
    return '–';
  }
  if (n >= 1 << 60) {
    return 'unlimited';
  }
  if (n >= 2 ** 30) {
    return `${(n / 2 ** 30).toFixed(2)} GiB`;
  }
  return n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${(n / 2 ** 10).toFixed(1)} KiB`;
}

/** Replace `node`'s children, skipping the absent ones (sections show optional lines). */
function fill(node: HTMLElement, ...children: Child[]): void {
  node.replaceChildren(...(children.filter(Boolean) as (Node | string)[]));
}

function bar(used: number, total: number, djinn: number | null): HTMLElement {
  const pct = (x: number) => `${Math.min(100, (100 * x) / Math.max(total, 1)).toFixed(1)}%`;
  const track = h('div', { class: 'djinn-bar' }, h('div', { class: 'djinn-bar-used', style: `width:${pct(used)}` }));
  if (djinn !== null) {
    track.append(h('div', { class: 'djinn-bar-djinn', style: `width:${pct(djinn)}` }));
  }
  return track;
}

export class DjinnPanel extends Widget {
  constructor(
    private readonly tracker: INotebookTracker,
    private readonly openNotebook: (path: string) => void
  ) {
    super();
    this.id = 'djinn-sidebar';
    this.addClass('djinn-sidebar');
    this.title.caption = 'Djinn debugger';
    this.node.append(this._daemon, this._gpu, this._models, this._sessions, this._notebook);
    tracker.widgetAdded.connect((_, panel) => this._link(panel));
    tracker.forEach(panel => this._link(panel));
    tracker.currentChanged.connect(() => void this._poll.refresh());
    this._poll = new Poll({
      factory: () => this._tick(),
      frequency: { interval: 2000, backoff: true, max: 30000 },
      standby: () => !this.isVisible || 'when-hidden',
      name: 'djinn:sidebar'
    });
  }

  dispose(): void {
    this._poll.dispose();
    super.dispose();
  }

  protected onAfterShow(): void {
    void this._poll.refresh();
  }

  /** Every notebook gets its link when it opens, so the kernel's comm finds a listener at `%load_ext`. */
  private _link(panel: NotebookPanel): KernelLink {
    let link = this._links.get(panel);
    if (!link) {
      link = new KernelLink(panel.sessionContext);
      link.changed.connect(() => {
        if (panel === this.tracker.currentWidget) {
          this._renderNotebook();
        }
      });
      this._links.set(panel, link);
      panel.disposed.connect(() => this._links.delete(panel));
    }
    return link;
  }

  private _current(): KernelLink | null {
    const panel = this.tracker.currentWidget;
    return panel ? this._link(panel) : null;
  }

  private async _tick(): Promise<void> {
    const link = this._current();
    const [status] = await Promise.all([
      fetchStatus(),
      link && !link.busy ? link.request('state').catch(() => null) : null  // a reset link shows "not loaded"
    ]);
    if (this._status?.daemon.pid && status.daemon.pid && this._status.daemon.pid !== status.daemon.pid) {
      this._restartedFrom = this._status.daemon.pid;
    }
    this._status = status;
    this._render();
  }

  private async _act(action: string, args: Record<string, unknown> = {}): Promise<void> {
    const link = this._current();
    if (!link) {
      return;
    }
    this._error = null;
    this._busy = action;
    this._renderNotebook();
    try {
      await link.request(action, args);
    } catch (err) {
      this._error = String((err as Error).message ?? err);
    } finally {
      this._busy = null;
    }
    await this._poll.refresh();
    this._renderNotebook();
  }

  private _render(): void {
    const status = this._status;
    if (!status) {
      return;
    }
    const d = status.daemon;
    const restarted = this._restartedFrom
      ? h('div', { class: 'djinn-note' }, `The daemon restarted (pid ${this._restartedFrom} → ${d.pid}); sessions of the old one are gone.`)
      : null;
    fill(this._daemon, 
      h('h2', {}, 'Djinn'),
      d.state === 'running'
        ? h('div', { class: 'djinn-daemon', 'data-state': 'running' }, `Daemon pid ${d.pid} on ${d.device}`)
        : h('div', { class: 'djinn-daemon djinn-warn', 'data-state': d.state }, d.message ?? d.state),
      restarted
    );
    this._renderGpu(status);
    fill(this._models, 
      h('h3', {}, 'Models'),
      ...(status.models.length
        ? status.models.map(m => h('div', { class: 'djinn-row' }, h('span', {}, m.name), h('span', {}, `${bytes(m.weight_bytes)} ${m.dtype}`)))
        : [h('div', { class: 'djinn-muted' }, 'none loaded')])
    );
    this._renderSessions(status.sessions);
    this._renderNotebook();
  }

  private _renderGpu(status: IStatus): void {
    const gpu = status.gpu;
    const rows: Child[] = [h('h3', {}, 'GPU')];
    if (gpu.available && gpu.devices) {
      gpu.devices.forEach((dev, i) => {
        const djinn = i === 0 ? status.djinn_gpu_bytes : null;
        rows.push(
          h('div', { class: 'djinn-row' }, h('span', {}, dev.name), h('span', {}, `${bytes(dev.used)} / ${bytes(dev.total)}`)),
          bar(dev.used, dev.total, djinn),
          djinn !== null ? h('div', { class: 'djinn-muted' }, `Djinn: ${bytes(djinn)}`) : null
        );
      });
    } else {
      rows.push(
        h('div', { class: 'djinn-muted', 'data-gpu': 'none' }, gpu.reason ?? 'no GPU'),
        status.djinn_gpu_bytes !== null ? h('div', {}, `Djinn holds ${bytes(status.djinn_gpu_bytes)} on ${status.daemon.device}`) : null
      );
    }
    const pool = status.host_pool;
    if (pool) {
      rows.push(
        h('div', { class: 'djinn-row' }, h('span', {}, 'Host pool'), h('span', {}, `${bytes(pool.used)} / ${bytes(pool.reserved)} reserved`)),
        bar(pool.used, Math.max(pool.reserved, 1), null)
      );
    }
    fill(this._gpu, ...rows);
  }

  /** Sessions of open notebooks (and of the current kernel) one per row; every other one only counted. */
  private _renderSessions(sessions: ISessionRow[]): void {
    const mine = new Set(this._current()?.state?.sessions ?? []);
    const shown = sessions.filter(s => s.notebook || mine.has(s.id));
    const others = sessions.filter(s => !shown.includes(s));
    const counts = new Map<string, number>();
    others.forEach(s => counts.set(s.state, (counts.get(s.state) ?? 0) + 1));
    const rows = shown.map(s => {
      const where = s.notebook ?? this.tracker.currentWidget?.context.path ?? '';
      const link = h('a', { class: 'djinn-link', title: `open ${where}` }, where.split('/').pop() ?? where);
      link.onclick = () => this.openNotebook(where);
      return h(
        'div',
        { class: 'djinn-session', 'data-session': String(s.id), 'data-state': s.state },
        h('span', { class: 'djinn-state' }, s.state),
        h('span', {}, `#${s.id} ${s.model}`),
        h('span', { title: 'on GPU / on host' }, `${bytes(s.gpu_bytes)} · ${bytes(s.host_bytes)} host`),
        link
      );
    });
    const summary = [...counts].map(([state, n]) => `${n} ${state}`).join(', ');
    fill(this._sessions, 
      h('h3', {}, 'Sessions'),
      ...rows,
      others.length ? h('div', { class: 'djinn-muted' }, `${others.length} other session(s): ${summary}`) : null,
      sessions.length ? null : h('div', { class: 'djinn-muted' }, 'none')
    );
  }

  private _renderNotebook(): void {
    const panel = this.tracker.currentWidget;
    const state: IKernelState | null = panel ? this._link(panel).state : null;
    const title = h('h3', {}, panel ? `This notebook: ${panel.title.label}` : 'This notebook');
    if (!panel) {
      this._rendered = '';
      fill(this._notebook, title, h('div', { class: 'djinn-muted' }, 'Open a notebook to drive its run.'));
      return;
    }
    if (!state) {
      this._rendered = '';
      fill(this._notebook, 
        title,
        h('div', { class: 'djinn-muted', 'data-kernel': 'no-djinn' }, 'Djinn is not loaded in this kernel: run %load_ext djinn_kernel')
      );
      return;
    }
    const error = this._error ?? state.error;
    const key = JSON.stringify([panel.id, state, error, this._busy]);
    if (key === this._rendered) {
      return; // unchanged: keep the DOM, and with it focus and a half-typed layer number
    }
    this._rendered = key;
    fill(this._notebook, 
      title,
      state.loaded
        ? h('div', {}, `${state.model}, session #${state.session}`)
        : h('div', { class: 'djinn-muted' }, 'No model loaded: %djinn load MODEL'),
      ...(state.loaded ? [this._breakpoints(state), this._pause(state), this._controls(state)] : []),
      error ? h('div', { class: 'djinn-error' }, error) : null
    );
  }

  private _breakpoints(state: IKernelState): HTMLElement {
    const rows = (state.breakpoints ?? []).map(b => {
      const toggle = h('input', { type: 'checkbox', title: b.enabled ? 'disable' : 'enable' }) as HTMLInputElement;
      toggle.checked = b.enabled;
      toggle.onchange = () => void this._act(b.enabled ? 'disable' : 'enable', { path: b.path, side: b.side, id: b.id });
      const remove = h('button', { class: 'djinn-small', title: 'delete' }, '×');
      remove.onclick = () => void this._act('delete', { path: b.path, side: b.side, id: b.id });
      const where = b.layer !== null ? `layer ${b.layer}` : b.path;
      const tokens = b.tokens ? ` tokens ${b.tokens[0]}–${b.tokens[1]}` : '';
      return h('div', { class: 'djinn-row djinn-bp' }, toggle, h('span', {}, `${where} (${b.side})${tokens}, ${b.hits} hit(s)`), remove);
    });
    return h('div', {}, h('h4', {}, 'Breakpoints'), ...rows, this._addBreakpoint);
  }

  private _pause(state: IKernelState): HTMLElement {
    const run = state.run;
    const p = state.pause;
    let text = 'No run yet: %djinn run PROMPT';
    if (run && p) {
      const where = p.layer !== null ? `layer ${p.layer}` : p.path;
      text = `Run ${run.id} paused at ${where} (${p.side}), token step ${p.token_step}, [${p.shape.join(', ')}] ${p.dtype}, ${p.edits} edit(s)`;
    } else if (run) {
      text = `Run ${run.id} ${run.state}: ${run.tokens} token(s)`;
    }
    return h('div', { class: 'djinn-pause', 'data-run-state': run?.state ?? 'none', 'data-token-step': String(run?.token_step ?? '') }, text);
  }

  private _controls(state: IKernelState): HTMLElement {
    const paused = state.run?.state === 'paused';
    const live = paused || state.run?.state === 'running';
    const buttons = ACTIONS.map(action => {
      const button = h('button', { class: 'djinn-action', 'data-djinn-action': action }, action[0].toUpperCase() + action.slice(1)) as HTMLButtonElement;
      button.disabled = this._busy !== null || !(action === 'cancel' ? live : paused);
      button.onclick = () => void this._act(action);
      return button;
    });
    return h('div', { class: 'djinn-controls' }, ...buttons);
  }

  private _addForm(): HTMLElement {
    const input = h('input', { type: 'number', min: '0', placeholder: 'layer', class: 'djinn-layer' }) as HTMLInputElement;
    const add = h('button', { class: 'djinn-small', 'data-djinn-action': 'break' }, 'Add');
    add.onclick = () => input.value !== '' && void this._act('break', { layer: Number(input.value) });
    return h('div', { class: 'djinn-row' }, input, add);
  }

  private readonly _poll: Poll;
  private readonly _addBreakpoint = this._addForm();
  private _rendered = '';
  private readonly _links = new Map<NotebookPanel, KernelLink>();
  private _status: IStatus | null = null;
  private _restartedFrom: number | null = null;
  private _error: string | null = null;
  private _busy: string | null = null;
  private readonly _daemon = h('section', { class: 'djinn-section' });
  private readonly _gpu = h('section', { class: 'djinn-section' });
  private readonly _models = h('section', { class: 'djinn-section' });
  private readonly _sessions = h('section', { class: 'djinn-section' });
  private readonly _notebook = h('section', { class: 'djinn-section djinn-notebook' });
}
