/**
 * One notebook's channel to its kernel's Djinn (the comm `djinn_kernel.comm` opens at `%load_ext djinn_kernel`).
 *
 * The kernel opens the comm; a sidebar loaded later finds it again with a comm-info request. Every action is a
 * `%djinn` subcommand run by the kernel, so `_djinn`, the notebook's widgets and the daemon's ownership rules
 * behave exactly as if the user had typed it. `state` is null while the kernel has no Djinn loaded.
 */
import { ISessionContext } from '@jupyterlab/apputils';
import { Kernel, KernelMessage } from '@jupyterlab/services';
import { ISignal, Signal } from '@lumino/signaling';

export const TARGET = 'djinn';

export interface IPauseInfo {
  path: string;
  layer: number | null;
  side: string;
  token_step: number;
  shape: number[];
  dtype: string;
  edits: number;
}

export interface IBreakpoint {
  id: number | null;
  path: string;
  layer: number | null;
  side: string;
  tokens: [number, number] | null;
  hits: number;
  enabled: boolean;
}

export interface IKernelState {
  loaded: boolean;
  model?: string;
  session?: number;
  sessions?: number[];
  breakpoints?: IBreakpoint[];
  run?: { id: number; state: string; token_step: number; tokens: number; text: string } | null;
  pause?: IPauseInfo | null;
  error?: string | null;
}

interface IReply {
  request: number | null;
  error: string | null;
  state: IKernelState;
}

export class KernelLink {
  constructor(private readonly context: ISessionContext) {
    context.kernelChanged.connect(this._onKernel, this);
    context.statusChanged.connect((_, status) => {
      if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
        this._reset();
      }
    });
    this._onKernel();
  }

  /** The kernel's Djinn state from its last answer; null when Djinn is not loaded there. */
  get state(): IKernelState | null {
    return this._state;
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Busy kernels answer after their cell: callers skip polling then instead of queueing requests. */
  get busy(): boolean {
    return this.context.session?.kernel?.status !== 'idle';
  }

  /** Run `action` in the kernel and resolve when it answered; rejects with the kernel's message on failure. */
  async request(action: string, args: Record<string, unknown> = {}): Promise<IKernelState | null> {
    const kernel = this.context.session?.kernel;
    if (!this._comm && kernel) {
      await this._reattach(kernel);
    }
    if (!this._comm) {
      return null;
    }
    const id = this._next++;
    const reply = new Promise<IReply>((resolve, reject) => this._pending.set(id, { resolve, reject }));
    this._comm.send({ request: id, action, ...args } as any);
    const answer = await reply;
    if (answer.error) {
      throw new Error(answer.error);
    }
    return answer.state;
  }

  private _onKernel(): void {
    this._reset();
    const kernel = this.context.session?.kernel;
    if (kernel) {
      kernel.registerCommTarget(TARGET, (comm, msg) => this._attach(comm, msg.content.data as any));
    }
  }

  private async _reattach(kernel: Kernel.IKernelConnection): Promise<void> {
    const reply = await kernel.requestCommInfo({ target_name: TARGET });
    if (reply.content.status !== 'ok' || this._comm) {
      return;
    }
    const ids = Object.keys(reply.content.comms);
    if (ids.length) {
      this._attach(kernel.createComm(TARGET, ids[ids.length - 1]), null);
    }
  }

  private _attach(comm: Kernel.IComm, data: IReply | null): void {
    this._comm = comm;
    comm.onMsg = (msg: KernelMessage.ICommMsgMsg) => this._onReply(msg.content.data as any);
    comm.onClose = () => this._reset();
    if (data) {
      this._onReply(data);
    }
  }

  private _onReply(reply: IReply): void {
    this._state = reply.state;
    const waiter = reply.request === null ? undefined : this._pending.get(reply.request);
    if (waiter) {
      this._pending.delete(reply.request as number);
      waiter.resolve(reply);
    }
    this._changed.emit();
  }

  private _reset(): void {
    this._comm = null;
    this._state = null;
    for (const waiter of this._pending.values()) {
      waiter.reject(new Error('the kernel restarted or closed the Djinn channel'));
    }
    this._pending.clear();
    this._changed.emit();
  }

  private _comm: Kernel.IComm | null = null;
  private _state: IKernelState | null = null;
  private _next = 1;
  private _pending = new Map<number, { resolve: (r: IReply) => void; reject: (e: Error) => void }>();
  private _changed = new Signal<this, void>(this);
}
