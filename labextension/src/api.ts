import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** One cluster as the server lists it (see jupyter_mlcloud.clusters.list_clusters). */
export interface ICluster {
  name: string;
  kind: string;
  address: string | null;
  dashboard: string | null;
  pid: number;
  host: string;
  owner: string;
  status: string;
  tls: boolean;
  workers: number | null;
  threads: number | null;
  memory: number | null;
  gpus: number | null;
  reachable: boolean;
}

/** GET a JSON document under the extension's REST namespace, `<base>/mlcloud/...`. */
export async function requestAPI<T>(path: string): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'mlcloud', path);
  const response = await ServerConnection.makeRequest(url, {}, settings);
  if (!response.ok) {
    throw new Error(`the server answered ${response.status} ${response.statusText}`);
  }
  return (await response.json()) as T;
}

/** Every discovered cluster, with live worker figures. */
export async function listClusters(): Promise<ICluster[]> {
  const body = await requestAPI<{ clusters: ICluster[] }>('clusters');
  return body.clusters;
}
