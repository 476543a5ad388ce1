/**
 * The server extension's view of the daemon (GET /djinn/status), through JupyterLab's authenticated
 * connection settings: the sidebar never talks to the daemon itself.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface IGpu {
  available: boolean;
  reason?: string;
  devices?: { index: number; name: string; total: number; used: number }[];
}

export interface ISessionRow {
  id: number;
  model: string;
  state: string;
  gpu_bytes: number;
  host_bytes: number;
  client: string;
  notebook: string | null;
}

export interface IStatus {
  daemon: { state: 'running' | 'absent' | 'unreachable'; pid?: number; message?: string; device?: string };
  gpu: IGpu;
  models: { id: string; name: string; weight_bytes: number; dtype: string; num_layers: number }[];
  sessions: ISessionRow[];
  host_pool: { capacity: number; reserved: number; used: number; pinned: boolean } | null;
  djinn_gpu_bytes: number | null;
}

export async function fetchStatus(): Promise<IStatus> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'djinn', 'status');
  const response = await ServerConnection.makeRequest(url, {}, settings);
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response, `Djinn status: HTTP ${response.status}`);
  }
  return (await response.json()) as IStatus;
}
