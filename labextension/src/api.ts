import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** One cluster as the server lists it (see jupyter_mlcloud.cluster.api.list_clusters_async). */
export interface ICluster {
  name: string;
  kind: string;
  address: string | null;
  dashboard: string | null;
  pid: number;
  owner: string;
  status: string;
  workers: number | null;
  threads: number | null;
  /** Total worker memory in bytes. */
  memory: number | null;
  gpus: number | null;
  host?: string;
  tls?: boolean;
  /** False when the scheduler did not answer the server's probe in time. */
  reachable?: boolean;
}

/** The longest error text the panel shows; the server's messages are one sentence. */
const MAX_MESSAGE = 200;

/** An error with a short, user-facing message (never a stack trace). */
export class APIError extends Error {
  constructor(message: string) {
    super(message.length > MAX_MESSAGE ? `${message.slice(0, MAX_MESSAGE - 1)}…` : message);
    this.name = 'APIError';
  }
}

/** The server's own one-line explanation of a failed response, when it sent one. */
async function failureMessage(response: Response): Promise<string> {
  let detail = '';
  try {
    const body = (await response.json()) as { message?: unknown; reason?: unknown };
    const message = body.message ?? body.reason;
    if (typeof message === 'string') {
      detail = message.split('\n')[0];
    }
  } catch {
    // Not JSON (a proxy's HTML page, say): the status line says enough.
  }
  const status = `${response.status} ${response.statusText}`.trim();
  return detail ? `${detail} (${status})` : `the server answered ${status}`;
}

/**
 * Call the extension's REST API under `<baseUrl>mlcloud/<path>` and return the decoded JSON
 * (undefined for an empty answer such as 204). Every failure becomes an `APIError`.
 */
export async function requestAPI<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'mlcloud', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (reason) {
    throw new APIError(`the Jupyter server cannot be reached (${errorText(reason)})`);
  }
  if (!response.ok) {
    throw new APIError(await failureMessage(response));
  }
  const text = await response.text();
  if (!text) {
    return undefined as T;
  }
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new APIError('the server answered something that is not JSON');
  }
}

/** Every discovered cluster, with live worker figures. */
export async function listClusters(): Promise<ICluster[]> {
  const body = await requestAPI<{ clusters?: ICluster[] }>('clusters');
  if (!body || !Array.isArray(body.clusters)) {
    throw new APIError('the server answered without a cluster list');
  }
  return body.clusters;
}

/** The first line of whatever was thrown: an Error's message, or its string form. */
export function errorText(reason: unknown): string {
  const text = reason instanceof Error ? reason.message : String(reason);
  return text.split('\n')[0] || 'unknown error';
}

/** One training run as the server lists it (see jupyter_mlcloud.telemetry.fold.list_runs). */
export interface IRun {
  run: string;
  /** "running", "finished", "error", "cancelled", ... as the launcher logged it. */
  status: string;
  cluster: string;
  started: number;
  ended: number | null;
  workers?: string[];
  pid?: number | null;
  /** How many metric points the ranks logged. */
  points: number;
  step: number | null;
  /** The last logged point's metrics (loss, ...), without rank/step/epoch/time. */
  last: { [metric: string]: number };
  /** False while its scheduler does not answer: the run is shown as last seen. */
  reachable?: boolean;
  /** Where MLflow records the run, once it does. */
  mlflow?: IMlflowRun;
}

/** A run's MLflow record, as the kernel announced it on the runs topic. */
export interface IMlflowRun {
  run_id: string;
  experiment_id: string;
  uri: string;
}

/** Every training run on the discovered clusters, newest first. */
export async function listRuns(): Promise<IRun[]> {
  const body = await requestAPI<{ runs?: IRun[] }>('runs');
  if (!body || !Array.isArray(body.runs)) {
    throw new APIError('the server answered without a run list');
  }
  return body.runs;
}

/** Options of `POST /mlcloud/clusters` (the server's START_OPTIONS, as `mlcloud.up`). */
export interface IStartOptions {
  name?: string;
  workers?: number;
  threads_per_worker?: number;
  memory_limit?: string | number;
  gpu?: boolean;
  adapt?: string;
}

function jsonRequest(method: string, body: unknown): RequestInit {
  return {
    method,
    body: JSON.stringify(body),
    headers: { 'Content-Type': 'application/json' }
  };
}

function clusterPath(name: string): string {
  return URLExt.join('clusters', encodeURIComponent(name));
}

/** Start a cluster held by the Jupyter server; resolves to its description. */
export async function startCluster(options: IStartOptions): Promise<ICluster> {
  return requestAPI<ICluster>('clusters', jsonRequest('POST', options));
}

/** Set a server-held cluster's worker count. */
export async function scaleCluster(name: string, workers: number): Promise<void> {
  await requestAPI<unknown>(clusterPath(name), jsonRequest('PATCH', { workers }));
}

/** Turn on adaptive scaling between `minimum` and `maximum` workers. */
export async function adaptCluster(name: string, minimum: number, maximum: number): Promise<void> {
  await requestAPI<unknown>(clusterPath(name), jsonRequest('PATCH', { adapt: [minimum, maximum] }));
}

/** Shut a server-held cluster down. */
export async function shutDownCluster(name: string): Promise<void> {
  await requestAPI<unknown>(clusterPath(name), { method: 'DELETE' });
}

/** What the server's event socket sends: both lists, whenever either changes. */
export interface ILists {
  clusters: ICluster[];
  runs: IRun[];
}

/** The lists in a socket message, or null when the message is not such a pair of lists. */
export function parseLists(text: string): ILists | null {
  try {
    const body = JSON.parse(text) as Partial<ILists>;
    if (Array.isArray(body.clusters) && Array.isArray(body.runs)) {
      return { clusters: body.clusters, runs: body.runs };
    }
  } catch {
    // not JSON: ignored like any other unexpected message
  }
  return null;
}

/**
 * Open the server's event socket (`<wsUrl>mlcloud/events`, behind Jupyter's authentication):
 * `onLists` gets the cluster and run lists at once and after every change; `onClose` is called
 * once when the socket closes or cannot open.
 */
export function openEvents(onLists: (lists: ILists) => void, onClose: () => void): WebSocket {
  const settings = ServerConnection.makeSettings();
  let url = URLExt.join(settings.wsUrl, 'mlcloud', 'events');
  if (settings.token && settings.appendToken) {
    url += `?token=${encodeURIComponent(settings.token)}`;
  }
  const socket = new settings.WebSocket(url);
  socket.onmessage = event => {
    const lists = parseLists(String(event.data));
    if (lists) {
      onLists(lists);
    }
  };
  socket.onclose = () => onClose();
  return socket;
}

/** One version of a registered model (see jupyter_mlcloud.tracking.registry.models). */
export interface IModelVersion {
  version: number;
  run_id: string | null;
  aliases: string[];
  /** Unix seconds. */
  created: number;
  /** The latest metrics of the run the version came from. */
  metrics: { [name: string]: number };
}

/** A registered model: its aliases and its versions, newest first. */
export interface IModel {
  name: string;
  aliases: { [alias: string]: number };
  versions: IModelVersion[];
}

/** Every registered model of the tracking store the Jupyter server reads. */
export async function listModels(): Promise<IModel[]> {
  const body = await requestAPI<{ models?: IModel[] }>('models');
  if (!body || !Array.isArray(body.models)) {
    throw new APIError('the server answered without a model list');
  }
  return body.models;
}

/** Point `name@alias` at `version`; resolves to the model as it is now. */
export async function setAlias(name: string, alias: string, version: number): Promise<IModel> {
  const path = URLExt.join(
    'models',
    encodeURIComponent(name),
    'aliases',
    encodeURIComponent(alias)
  );
  return requestAPI<IModel>(path, jsonRequest('PUT', { version }));
}

/**
 * The MLflow UI, served by the Jupyter server at `<baseUrl>mlflow/` (behind its
 * authentication); `route` is a page of the UI, such as `/models/digits/versions/2`.
 */
export function mlflowUrl(route = ''): string {
  const root = URLExt.join(ServerConnection.makeSettings().baseUrl, 'mlflow') + '/';
  return route ? `${root}#${route}` : root;
}

/** The MLflow UI's page of a run. */
export function mlflowRunUrl(run: IMlflowRun): string {
  return mlflowUrl(
    `/experiments/${encodeURIComponent(run.experiment_id)}/runs/${encodeURIComponent(run.run_id)}`
  );
}

/** The MLflow UI's page of a model version. */
export function mlflowVersionUrl(name: string, version: number): string {
  return mlflowUrl(`/models/${encodeURIComponent(name)}/versions/${version}`);
}

/** Figures the router measured (null until it has them, or while it does not answer). */
export interface IEndpointFigures {
  requests: number | null;
  errors: number | null;
  /** Requests per second over the last seconds. */
  rps: number | null;
  /** Latency percentiles over the last minute, in milliseconds. */
  p50_ms: number | null;
  p99_ms: number | null;
}

/** One live version of an endpoint, with its share of the traffic. */
export interface IEndpointVersion extends IEndpointFigures {
  version: number;
  /** Share of the traffic, 0 to 1. */
  weight: number;
  /** What the version serves (a model class, a path or a models:/ URI). */
  source: string | null;
  replicas: number;
  workers: string[];
}

/** An endpoint as the server lists it (see jupyter_mlcloud.serving.board.describe). */
export interface IEndpoint extends IEndpointFigures {
  cluster: string;
  name: string;
  id: string;
  url: string;
  versions: IEndpointVersion[];
  replicas: number;
  workers: string[];
  autoscale: { min: number; max: number } | null;
  created: number | null;
  /** False while its scheduler does not answer: the endpoint is shown as last seen. */
  reachable: boolean;
  /** Whether it is watched against a reference (drift, delayed labels, alerts). */
  watched?: boolean;
  /** The controller's last drift check: drifted features, and the five that moved most. */
  drift?: IEndpointDrift | null;
  /** Its newest alerts, oldest first. */
  alerts?: IEndpointAlert[];
}

/** A watched endpoint's last drift check. */
export interface IEndpointDrift {
  time: number;
  version: number;
  drifted: string[];
  /** [feature, effect, psi], largest effect first. */
  top: [string, number, number][];
}

/** A drift that started, or quality past its threshold. */
export interface IEndpointAlert {
  kind: 'drift' | 'quality';
  version: number;
  features: string[];
  message: string;
  time: number;
}

/** What `GET /mlcloud/endpoints` answers. */
export interface IEndpointList {
  endpoints: IEndpoint[];
  /** Clusters whose scheduler did not answer in time. */
  unreachable: string[];
}

/** Every endpoint on every discovered cluster, with live figures. */
export async function listEndpoints(): Promise<IEndpointList> {
  const body = await requestAPI<Partial<IEndpointList>>('endpoints');
  if (!body || !Array.isArray(body.endpoints)) {
    throw new APIError('the server answered without an endpoint list');
  }
  return { endpoints: body.endpoints, unreachable: body.unreachable ?? [] };
}

function endpointPath(cluster: string, name: string, action: string): string {
  return URLExt.join('endpoints', encodeURIComponent(cluster), encodeURIComponent(name), action);
}

/** Run `replicas` replicas of the endpoint's main version; resolves to the endpoint now. */
export async function scaleEndpoint(
  cluster: string,
  name: string,
  replicas: number
): Promise<IEndpoint> {
  return requestAPI<IEndpoint>(
    endpointPath(cluster, name, 'scale'),
    jsonRequest('POST', { replicas })
  );
}

/** All traffic to the endpoint's newest version; resolves to the endpoint now. */
export async function promoteEndpoint(cluster: string, name: string): Promise<IEndpoint> {
  return requestAPI<IEndpoint>(endpointPath(cluster, name, 'promote'), jsonRequest('POST', {}));
}

/** Back to the endpoint's previous version; resolves to the endpoint now. */
export async function rollbackEndpoint(cluster: string, name: string): Promise<IEndpoint> {
  return requestAPI<IEndpoint>(endpointPath(cluster, name, 'rollback'), jsonRequest('POST', {}));
}

/** A tuning study as the server lists it (see jupyter_mlcloud.tuning.record.studies). */
export interface IStudy {
  name: string;
  mlflow_run_id: string;
  experiment_id: string;
  /** running, finished, failed or killed (its MLflow run's status). */
  state: string;
  direction: string;
  metric: string;
  n_trials: number | null;
  /** preempted: trials whose workers were taken away, asked again (absent from older servers). */
  counts: {
    complete: number;
    pruned: number;
    failed: number;
    preempted?: number;
    running: number;
  };
  best_value: number | null;
  best_trial: string | null;
  cost: number | null;
  worker_seconds: number | null;
  started: number;
  ended: number | null;
}

/** One trial of a study (see jupyter_mlcloud.tuning.record.study). */
export interface ITrial {
  number: number;
  mlflow_run_id: string;
  /** The training run's id (what loss panels show), when it was tracked. */
  run_id: string | null;
  /** complete, pruned, failed, preempted or running. */
  state: string;
  value: number | null;
  params: { [name: string]: string };
}

/** A study with its trials, by number. */
export interface IStudyDetail extends IStudy {
  space: string[];
  trials: ITrial[];
}

/** The newest tuning studies of the tracking store. */
export async function listStudies(): Promise<IStudy[]> {
  const body = await requestAPI<{ studies?: IStudy[] }>('studies');
  if (!body || !Array.isArray(body.studies)) {
    throw new APIError('the server answered without a study list');
  }
  return body.studies;
}

/** One study, by its MLflow run id, with its trials. */
export async function getStudy(runId: string): Promise<IStudyDetail> {
  const body = await requestAPI<IStudyDetail>(`studies/${encodeURIComponent(runId)}`);
  if (!body || !Array.isArray(body.trials)) {
    throw new APIError('the server answered without the study’s trials');
  }
  return body;
}

/** One step of a pipeline run (see jupyter_mlcloud.pipelines.record.runs). */
export interface IPipelineStep {
  name: string;
  /** pending, running, done, cached, skipped, failed or not-run. */
  state: string;
  /** Seconds (so far, while running); null when it has not started. */
  duration: number | null;
  mlflow_run_id: string | null;
  error: string | null;
}

/** One run of a pipeline. */
export interface IPipelineRun {
  pipeline: string;
  mlflow_run_id: string;
  experiment_id: string;
  /** running, finished, failed or killed. */
  status: string;
  started: number;
  duration: number;
  steps: IPipelineStep[];
}

/** A pipeline with its last runs, newest first. */
export interface IPipeline {
  name: string;
  runs: IPipelineRun[];
}

/** The pipelines of the tracking store, the most recently run first. */
export async function listPipelines(): Promise<IPipeline[]> {
  const body = await requestAPI<{ pipelines?: IPipeline[] }>('pipelines');
  if (!body || !Array.isArray(body.pipelines)) {
    throw new APIError('the server answered without a pipeline list');
  }
  return body.pipelines;
}
