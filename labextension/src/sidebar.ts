import { Widget } from '@lumino/widgets';

import {
  ICluster,
  IEndpoint,
  IEndpointList,
  IEndpointVersion,
  ILists,
  IModel,
  IModelVersion,
  IRun,
  IPipeline,
  IPipelineRun,
  IStartOptions,
  IStudy,
  adaptCluster,
  errorText,
  getStudy,
  listClusters,
  listEndpoints,
  listModels,
  listRuns,
  listPipelines,
  listStudies,
  mlflowRunUrl,
  mlflowUrl,
  mlflowVersionUrl,
  openEvents,
  promoteEndpoint,
  rollbackEndpoint,
  scaleCluster,
  scaleEndpoint,
  setAlias,
  shutDownCluster,
  startCluster
} from './api';

/** How often the lists are polled while the event socket is down and the panel visible. */
export const REFRESH_MS = 3000;
/** How long after the event socket closed the sidebar tries to open it again. */
export const RECONNECT_MS = 5000;
/** The most runs "Overlay all" puts in one loss panel (the server's limit). */
export const MAX_OVERLAY = 16;
/** How often the model list is fetched while the panel is visible (no socket pushes it). */
export const MODELS_REFRESH_MS = 10000;
/** Versions listed per model, newest first; the MLflow UI has the rest. */
export const MAX_VERSIONS = 5;
/** How often the endpoint list (and its live figures) is fetched while the panel is visible. */
export const ENDPOINTS_REFRESH_MS = 3000;
/** The alias the one-click button gives a version. */
export const CHAMPION = 'champion';

export const EMPTY_MESSAGE = 'No clusters yet. Start one in a notebook with %mlcloud up';
export const NO_RUNS_MESSAGE = 'No runs yet. Train with %%distributed_train';
export const NO_MODELS_MESSAGE = 'No registered models yet. Register one with mlc.register';
export const NO_ENDPOINTS_MESSAGE = 'No endpoints yet. Serve a model with mlc.serve';
export const NO_STUDIES_MESSAGE = 'No tuning studies yet. Tune with mlc.tune or %%tune';
export const NO_PIPELINES_MESSAGE = 'No pipeline runs yet. Run one with pipe.run()';
/** How often studies and pipelines are read from the tracking store while the panel is shown. */
export const STORE_REFRESH_MS = 5000;

const GIB = 2 ** 30;

/** Bytes as GiB with one decimal ("-" when unknown). */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !Number.isFinite(bytes)) {
    return '-';
  }
  return `${(bytes / GIB).toFixed(1)} GiB`;
}

function count(value: number | null | undefined): string {
  return value === null || value === undefined ? '-' : String(value);
}

/** A new element; text always goes in as textContent, never as markup. */
function element(tag: string, className: string, text?: string): HTMLElement {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text !== undefined) {
    node.textContent = text; // names and addresses come from files on disk: never innerHTML
  }
  return node;
}

function button(className: string, label: string, onClick: () => void): HTMLButtonElement {
  const node = element('button', `jp-mlcloud-button ${className}`, label) as HTMLButtonElement;
  node.type = 'button';
  node.addEventListener('click', onClick);
  return node;
}

function input(className: string, placeholder: string, type = 'text'): HTMLInputElement {
  const node = element('input', `jp-mlcloud-input ${className}`) as HTMLInputElement;
  node.type = type;
  node.placeholder = placeholder;
  node.setAttribute('aria-label', placeholder);
  return node;
}

/** Metrics as "name value" pairs, four significant digits. */
function formatMetrics(metrics: { [name: string]: number } | undefined): string {
  return Object.entries(metrics ?? {})
    .map(([k, v]) => `${k} ${typeof v === 'number' ? v.toPrecision(4) : String(v)}`)
    .join(' · ');
}

/**
 * A link into the MLflow UI: a plain click opens it through `open` (a JupyterLab tab), a
 * middle or modified click is left to the browser (a browser tab).
 */
function mlflowLink(
  className: string,
  label: string,
  url: string,
  open: MLflowOpener
): HTMLAnchorElement {
  const link = element('a', `jp-mlcloud-link ${className}`, label) as HTMLAnchorElement;
  link.href = url;
  link.target = '_blank';
  link.rel = 'noopener noreferrer';
  link.addEventListener('click', event => {
    if (event.button === 0 && !event.ctrlKey && !event.metaKey && !event.shiftKey) {
      event.preventDefault();
      open(url);
    }
  });
  return link;
}

/** Only http(s) dashboards become links (a discovery file could hold anything). */
function isWebAddress(address: string): boolean {
  try {
    const { protocol } = new URL(address);
    return protocol === 'http:' || protocol === 'https:';
  } catch {
    return false;
  }
}

/** A figure with `digits` decimals and a unit ("-" when unknown). */
function formatFigure(value: number | null | undefined, digits = 1, unit = ''): string {
  if (value === null || value === undefined || !Number.isFinite(value)) {
    return '-';
  }
  return `${value.toFixed(digits)}${unit}`;
}

/** "rps 12.0 · p50 3.1 ms · p99 7.9 ms · errors 0" of an endpoint or a version. */
function formatEndpointFigures(figures: {
  rps: number | null;
  p50_ms: number | null;
  p99_ms: number | null;
  errors: number | null;
}): string {
  return [
    `rps ${formatFigure(figures.rps)}`,
    `p50 ${formatFigure(figures.p50_ms, 1, ' ms')}`,
    `p99 ${formatFigure(figures.p99_ms, 1, ' ms')}`,
    `errors ${count(figures.errors)}`
  ].join(' · ');
}

/** "3 complete · 1 pruned · 0 failed · 1 running · best loss 0.2500 (minimize) · cost 0.75". */
export function formatStudy(study: IStudy): string {
  const { complete, pruned, failed, preempted, running } = study.counts;
  const parts = [
    `${complete}${study.n_trials ? `/${study.n_trials}` : ''} complete`,
    `${pruned} pruned`,
    `${failed} failed`,
    ...(preempted ? [`${preempted} preempted`] : []),
    `${running} running`
  ];
  if (study.best_value !== null) {
    parts.push(`best ${study.metric} ${study.best_value.toPrecision(4)} (${study.direction})`);
  }
  if (study.cost !== null) {
    parts.push(`cost ${study.cost.toFixed(2)}`);
  }
  return parts.join(' · ');
}

/** The step states whose duration means something (not-run and skipped steps did no work). */
const TIMED_STATES = new Set(['running', 'done', 'cached', 'failed']);

/** A duration in seconds as "0.4 s", "12 s" or "3.2 min" ("" when unknown). */
export function formatSeconds(seconds: number | null): string {
  if (seconds === null || !Number.isFinite(seconds)) {
    return '';
  }
  if (seconds < 10) {
    return `${seconds.toFixed(1)} s`;
  }
  return seconds < 120 ? `${Math.round(seconds)} s` : `${(seconds / 60).toFixed(1)} min`;
}

/** One pipeline run: status, start, duration, a "Graph" button (its page), and each step's
 * state and duration. */
function renderPipelineRun(run: IPipelineRun, openPanel: PanelOpener): HTMLElement {
  const row = element('div', 'jp-mlcloud-pipeline-run');
  row.dataset.runId = run.mlflow_run_id;
  row.dataset.runStatus = run.status;
  const title = element('div', 'jp-mlcloud-pipeline-title');
  const started = new Date(run.started).toLocaleString();
  title.appendChild(
    element(
      'span',
      'jp-mlcloud-pipeline-run-status',
      `${run.status} · ${started} · ${formatSeconds(run.duration)}`
    )
  );
  title.appendChild(
    button('jp-mlcloud-pipeline-graph', 'Graph', () => openPanel('pipeline', run.mlflow_run_id))
  );
  row.appendChild(title);
  const steps = element('div', 'jp-mlcloud-steps');
  for (const step of run.steps) {
    const chip = element(
      'span',
      `jp-mlcloud-step jp-mlcloud-step-${step.state.replace(/[^a-z-]/g, '')}`,
      `${step.name} ${step.state}${TIMED_STATES.has(step.state) ? ` ${formatSeconds(step.duration)}` : ''}`
    );
    chip.dataset.step = step.name;
    chip.dataset.stepState = step.state;
    if (step.error) {
      chip.title = step.error;
    }
    steps.appendChild(chip);
  }
  row.appendChild(steps);
  return row;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

/** Opens a Bokeh panel (served by the Jupyter server) as a main-area tab. */
export type PanelKind = 'loss' | 'resources' | 'endpoint' | 'pipeline';
export type PanelOpener = (kind: PanelKind, target: string) => void;

/** Puts code that attaches to a cluster into the active notebook (throws if there is none). */
export type ConnectInserter = (clusterName: string) => Promise<void>;

/** Shows a page of the MLflow UI (a URL under `<baseUrl>mlflow/`). */
export type MLflowOpener = (url: string) => void;

/** The "ML Cloud" panel: clusters (with actions), a new-cluster form, training runs, models,
 * endpoints. */
export class MLCloudSidebar extends Widget {
  private readonly clusters: HTMLElement;
  private readonly runs: HTMLElement;
  private readonly models: HTMLElement;
  private readonly endpoints: HTMLElement;
  private readonly studies: HTMLElement;
  private readonly pipelines: HTMLElement;
  private readonly message: HTMLElement;
  private timer: number | undefined;
  private modelsTimer: number | undefined;
  private endpointsTimer: number | undefined;
  private storeTimer: number | undefined;
  private studiesPending: Promise<void> | null = null;
  private shownStudies = '';
  private pipelinesPending: Promise<void> | null = null;
  private shownPipelines = '';
  /** The study whose trials are shown (its MLflow run id). */
  private selectedStudy: string | null = null;
  private endpointsPending: Promise<void> | null = null;
  /** Bumped by every endpoint change: a list fetched before it is stale. */
  private endpointsGeneration = 0;
  /** The endpoints the list shows now, and what it showed (to redraw only on change). */
  private listedEndpoints: IEndpointList = { endpoints: [], unreachable: [] };
  private shownEndpoints = '';
  /** Replica counts typed into endpoint scale boxes and not applied yet, by endpoint key. */
  private readonly replicaDrafts = new Map<string, string>();
  /** The server's event socket; while it is open, the lists come from it, not from polling. */
  private socket: WebSocket | null = null;
  private reconnect: number | undefined;
  /** Runs ticked for an overlay, kept across redraws of the list. */
  private readonly picked = new Set<string>();
  /** The runs the list shows now, newest first. */
  private listedRuns: IRun[] = [];
  private pending: Promise<void> | null = null;
  private modelsPending: Promise<void> | null = null;
  /** Bumped by every alias change: a model list fetched before it is stale. */
  private modelsGeneration = 0;
  /** The models the list shows now. */
  private listedModels: IModel[] = [];
  private shownModels = '';
  /** Alias names typed and not set yet, by model and version. */
  private readonly aliasDrafts = new Map<string, string>();
  /** What each list shows now, so an unchanged answer does not redraw (and wipe inputs). */
  private shownClusters = '';
  private shownRuns = '';
  /** Worker counts typed into scale boxes and not applied yet, by cluster name. */
  private readonly scaleDrafts = new Map<string, string>();

  constructor(
    private readonly openPanel: PanelOpener = () => undefined,
    private readonly insertConnect: ConnectInserter = async () => undefined,
    private readonly openMLflow: MLflowOpener = url => {
      window.open(url, '_blank', 'noopener');
    }
  ) {
    super();
    this.id = 'mlcloud-sidebar';
    this.addClass('jp-mlcloud-sidebar');
    this.title.caption = 'ML Cloud';

    const header = element('div', 'jp-mlcloud-header');
    header.appendChild(element('span', 'jp-mlcloud-title', 'ML Cloud'));
    const refresh = button('jp-mlcloud-refresh jp-Button', 'Refresh', () => void this.refresh());
    refresh.title = 'Refresh the cluster, run, model and endpoint lists';
    header.appendChild(refresh);
    this.node.appendChild(header);
    this.message = element('div', 'jp-mlcloud-message');
    this.message.setAttribute('aria-live', 'polite');
    this.node.appendChild(this.message);

    this.node.appendChild(element('div', 'jp-mlcloud-section', 'Clusters'));
    this.clusters = element('div', 'jp-mlcloud-clusters');
    this.node.appendChild(this.clusters);
    this.node.appendChild(this.newClusterForm());

    this.node.appendChild(element('div', 'jp-mlcloud-section', 'Training runs'));
    const overlay = element('div', 'jp-mlcloud-actions jp-mlcloud-run-actions');
    overlay.appendChild(
      button('jp-mlcloud-overlay', 'Overlay selected', () =>
        this.overlay(this.listedRuns.filter(r => this.picked.has(r.run)))
      )
    );
    overlay.appendChild(
      button('jp-mlcloud-overlay-all', 'Overlay all', () =>
        this.overlay(this.listedRuns.slice(0, MAX_OVERLAY))
      )
    );
    this.node.appendChild(overlay);
    this.runs = element('div', 'jp-mlcloud-runs');
    this.node.appendChild(this.runs);

    this.node.appendChild(element('div', 'jp-mlcloud-section', 'Studies'));
    this.studies = element('div', 'jp-mlcloud-studies');
    this.node.appendChild(this.studies);

    this.node.appendChild(element('div', 'jp-mlcloud-section', 'Pipelines'));
    this.pipelines = element('div', 'jp-mlcloud-pipelines');
    this.node.appendChild(this.pipelines);

    this.node.appendChild(element('div', 'jp-mlcloud-section', 'Models'));
    const tracking = element('div', 'jp-mlcloud-actions jp-mlcloud-model-actions');
    tracking.appendChild(
      mlflowLink('jp-mlcloud-open-mlflow', 'Open MLflow', mlflowUrl(), this.openMLflow)
    );
    this.node.appendChild(tracking);
    this.models = element('div', 'jp-mlcloud-models');
    this.node.appendChild(this.models);

    this.node.appendChild(element('div', 'jp-mlcloud-section', 'Endpoints'));
    this.endpoints = element('div', 'jp-mlcloud-endpoints');
    this.node.appendChild(this.endpoints);
    this.node.dataset.updates = 'polling';
  }

  /** Open one loss panel with `runs` overlaid. */
  private overlay(runs: IRun[]): void {
    if (runs.length === 0) {
      this.message.className = 'jp-mlcloud-message jp-mlcloud-message-error';
      this.message.textContent = 'Tick the runs to overlay first.';
      return;
    }
    this.message.className = 'jp-mlcloud-message';
    this.message.textContent = '';
    this.openPanel('loss', runs.map(r => r.run).join(','));
  }

  /**
   * Fetch clusters and runs and redraw what changed. While a request is in flight, callers
   * share it, so a slow server never has several answers racing to draw.
   */
  refresh(): Promise<void> {
    if (!this.pending) {
      this.pending = this.fetchAndRender().finally(() => {
        this.pending = null;
      });
    }
    return Promise.all([
      this.pending,
      this.refreshModels(),
      this.refreshEndpoints(),
      this.refreshStudies(),
      this.refreshPipelines()
    ]).then(() => undefined);
  }

  /** Fetch the pipelines and their last runs and redraw them if they changed. */
  refreshPipelines(): Promise<void> {
    if (!this.pipelinesPending) {
      this.pipelinesPending = listPipelines()
        .then(
          (value): PromiseSettledResult<IPipeline[]> => ({ status: 'fulfilled', value }),
          (reason): PromiseSettledResult<IPipeline[]> => ({ status: 'rejected', reason })
        )
        .then(result => {
          if (!this.isDisposed) {
            this.renderPipelines(result);
          }
        })
        .finally(() => {
          this.pipelinesPending = null;
        });
    }
    return this.pipelinesPending;
  }

  private renderPipelines(result: PromiseSettledResult<IPipeline[]>): void {
    const state =
      result.status === 'fulfilled'
        ? JSON.stringify(result.value)
        : `error:${errorText(result.reason)}`;
    if (state === this.shownPipelines) {
      return;
    }
    this.shownPipelines = state;
    if (result.status === 'rejected') {
      this.pipelines.replaceChildren(
        element(
          'div',
          'jp-mlcloud-pipelines-error',
          `Cannot list pipelines: ${errorText(result.reason)}`
        )
      );
      return;
    }
    if (result.value.length === 0) {
      this.pipelines.replaceChildren(
        element('div', 'jp-mlcloud-pipelines-empty', NO_PIPELINES_MESSAGE)
      );
      return;
    }
    this.pipelines.replaceChildren(
      ...result.value.map(pipeline => {
        const card = element('div', 'jp-mlcloud-pipeline');
        card.dataset.pipeline = pipeline.name;
        card.appendChild(element('div', 'jp-mlcloud-pipeline-name', pipeline.name));
        for (const run of pipeline.runs) {
          card.appendChild(renderPipelineRun(run, this.openPanel));
        }
        return card;
      })
    );
  }

  /** Fetch the tuning studies and redraw them if they changed; one request at a time. */
  refreshStudies(): Promise<void> {
    if (!this.studiesPending) {
      this.studiesPending = listStudies()
        .then(
          (value): PromiseSettledResult<IStudy[]> => ({ status: 'fulfilled', value }),
          (reason): PromiseSettledResult<IStudy[]> => ({ status: 'rejected', reason })
        )
        .then(result => {
          if (!this.isDisposed) {
            this.renderStudies(result);
          }
        })
        .finally(() => {
          this.studiesPending = null;
        });
    }
    return this.studiesPending;
  }

  private renderStudies(result: PromiseSettledResult<IStudy[]>): void {
    const state =
      result.status === 'fulfilled'
        ? JSON.stringify([result.value, this.selectedStudy])
        : `error:${errorText(result.reason)}`;
    if (state === this.shownStudies) {
      return;
    }
    this.shownStudies = state;
    if (result.status === 'rejected') {
      this.studies.replaceChildren(
        element(
          'div',
          'jp-mlcloud-studies-error',
          `Cannot list studies: ${errorText(result.reason)}`
        )
      );
      return;
    }
    if (result.value.length === 0) {
      this.studies.replaceChildren(element('div', 'jp-mlcloud-studies-empty', NO_STUDIES_MESSAGE));
      return;
    }
    this.studies.replaceChildren(...result.value.map(study => this.renderStudy(study)));
  }

  /** A study's row: name, state, trials by state, best value; selecting it overlays its
   * trials' loss curves and lists them. */
  private renderStudy(study: IStudy): HTMLElement {
    const card = element('div', 'jp-mlcloud-study');
    card.dataset.studyId = study.mlflow_run_id;
    card.dataset.studyState = study.state;
    const title = element('div', 'jp-mlcloud-study-title');
    title.appendChild(element('span', 'jp-mlcloud-study-name', study.name));
    title.appendChild(element('span', 'jp-mlcloud-study-state', study.state));
    title.appendChild(
      button('jp-mlcloud-study-overlay', 'Loss', () => void this.selectStudy(study))
    );
    card.appendChild(title);
    card.appendChild(element('div', 'jp-mlcloud-study-detail', formatStudy(study)));
    if (this.selectedStudy === study.mlflow_run_id) {
      card.classList.add('jp-mlcloud-study-selected');
      card.appendChild(element('div', 'jp-mlcloud-study-trials'));
      void this.showTrials(study.mlflow_run_id, card);
    }
    return card;
  }

  /** Select `study`: its trials' loss curves overlaid in one panel, its trials listed. */
  private async selectStudy(study: IStudy): Promise<void> {
    this.selectedStudy = study.mlflow_run_id;
    this.message.className = 'jp-mlcloud-message';
    this.message.textContent = '';
    this.shownStudies = ''; // redraw: the selection changed
    await this.refreshStudies();
    try {
      const detail = await getStudy(study.mlflow_run_id);
      const runs = detail.trials.map(t => t.run_id).filter((r): r is string => !!r);
      if (runs.length === 0) {
        throw new Error(`no trial of ${study.name} has a tracked training run yet`);
      }
      // The newest trials, as many as one panel overlays.
      this.openPanel('loss', runs.slice(-MAX_OVERLAY).join(','));
    } catch (reason) {
      this.message.className = 'jp-mlcloud-message jp-mlcloud-message-error';
      this.message.textContent = `Cannot overlay study ${study.name}: ${errorText(reason)}`;
    }
  }

  /** Fill the selected study's card with its trials (number, state, value, params). */
  private async showTrials(runId: string, card: HTMLElement): Promise<void> {
    const list = card.querySelector('.jp-mlcloud-study-trials');
    if (!list) {
      return;
    }
    try {
      const detail = await getStudy(runId);
      list.replaceChildren(
        ...detail.trials.map(trial => {
          const row = element('div', `jp-mlcloud-trial jp-mlcloud-trial-${trial.state}`);
          row.dataset.trialState = trial.state;
          row.dataset.runId = trial.run_id ?? '';
          const params = Object.entries(trial.params)
            .map(([k, v]) => `${k}=${v}`)
            .join(' ');
          const value =
            trial.value === null ? '' : ` · ${detail.metric} ${trial.value.toPrecision(4)}`;
          row.textContent = `#${trial.number} ${trial.state}${value}${params ? ` · ${params}` : ''}`;
          return row;
        })
      );
    } catch (reason) {
      list.replaceChildren(
        element('div', 'jp-mlcloud-studies-error', `Cannot list trials: ${errorText(reason)}`)
      );
    }
  }

  /** Fetch the endpoints and redraw them if they changed; one request at a time. */
  refreshEndpoints(): Promise<void> {
    if (!this.endpointsPending) {
      const generation = this.endpointsGeneration;
      this.endpointsPending = listEndpoints()
        .then(
          (value): PromiseSettledResult<IEndpointList> => ({ status: 'fulfilled', value }),
          (reason): PromiseSettledResult<IEndpointList> => ({ status: 'rejected', reason })
        )
        .then(result => {
          if (!this.isDisposed && generation === this.endpointsGeneration) {
            this.renderEndpoints(result);
          }
        })
        .finally(() => {
          this.endpointsPending = null;
        });
    }
    return this.endpointsPending;
  }

  /** Fetch the registered models and redraw them if they changed; one request at a time. */
  refreshModels(): Promise<void> {
    if (!this.modelsPending) {
      const generation = this.modelsGeneration;
      this.modelsPending = listModels()
        .then(
          (value): PromiseSettledResult<IModel[]> => ({ status: 'fulfilled', value }),
          (reason): PromiseSettledResult<IModel[]> => ({ status: 'rejected', reason })
        )
        .then(result => {
          if (!this.isDisposed && generation === this.modelsGeneration) {
            this.renderModels(result);
          }
        })
        .finally(() => {
          this.modelsPending = null;
        });
    }
    return this.modelsPending;
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.stopTimer();
    this.closeSocket();
    super.dispose();
  }

  protected onAfterAttach(): void {
    this.stopTimer();
    // Polling is the fallback: it only fetches while the event socket is not open.
    this.timer = window.setInterval(() => {
      if (this.isVisible && !this.socketOpen) {
        void this.refresh();
      }
    }, REFRESH_MS);
    // Nothing pushes registry changes: poll them, only while the panel is shown.
    this.modelsTimer = window.setInterval(() => {
      if (this.isVisible) {
        void this.refreshModels();
      }
    }, MODELS_REFRESH_MS);
    // Endpoint figures (requests per second, latency) change all the time: poll them.
    this.endpointsTimer = window.setInterval(() => {
      if (this.isVisible) {
        void this.refreshEndpoints();
      }
    }, ENDPOINTS_REFRESH_MS);
    // Studies and pipelines live in the tracking store, which pushes nothing: poll it.
    this.storeTimer = window.setInterval(() => {
      if (this.isVisible) {
        void this.refreshStudies();
        void this.refreshPipelines();
      }
    }, STORE_REFRESH_MS);
    this.openSocket();
    void this.refresh();
  }

  protected onBeforeDetach(): void {
    this.stopTimer();
    this.closeSocket();
  }

  private get socketOpen(): boolean {
    return this.socket?.readyState === WebSocket.OPEN;
  }

  /** Subscribe to the server's list changes; when the socket drops, poll and retry later. */
  private openSocket(): void {
    if (this.socket || this.isDisposed) {
      return;
    }
    let socket: WebSocket;
    try {
      socket = openEvents(
        lists => this.showLists(lists),
        () => {
          if (this.socket !== socket) {
            return; // closed on purpose
          }
          this.socket = null;
          this.node.dataset.updates = 'polling';
          this.reconnect = window.setTimeout(() => {
            this.reconnect = undefined;
            if (this.isAttached) {
              this.openSocket();
            }
          }, RECONNECT_MS);
        }
      );
    } catch {
      return; // no socket support: polling goes on
    }
    socket.addEventListener('open', () => {
      this.node.dataset.updates = 'socket';
    });
    this.socket = socket;
  }

  private closeSocket(): void {
    if (this.reconnect !== undefined) {
      window.clearTimeout(this.reconnect);
      this.reconnect = undefined;
    }
    const socket = this.socket;
    this.socket = null;
    socket?.close();
    this.node.dataset.updates = 'polling';
  }

  private showLists(lists: ILists): void {
    if (this.isDisposed) {
      return;
    }
    this.renderClusters({ status: 'fulfilled', value: lists.clusters });
    this.renderRuns({ status: 'fulfilled', value: lists.runs });
  }

  /** Polling pauses while the panel is collapsed: catch up at once when it is shown. */
  protected onAfterShow(): void {
    void this.refresh();
  }

  private stopTimer(): void {
    if (this.timer !== undefined) {
      window.clearInterval(this.timer);
      this.timer = undefined;
    }
    if (this.modelsTimer !== undefined) {
      window.clearInterval(this.modelsTimer);
      this.modelsTimer = undefined;
    }
    if (this.endpointsTimer !== undefined) {
      window.clearInterval(this.endpointsTimer);
      this.endpointsTimer = undefined;
    }
    if (this.storeTimer !== undefined) {
      window.clearInterval(this.storeTimer);
      this.storeTimer = undefined;
    }
  }

  private async fetchAndRender(): Promise<void> {
    // Independent: a slow or failing run listing never hides the clusters.
    const [clusters, runs] = await Promise.allSettled([listClusters(), listRuns()]);
    if (this.isDisposed) {
      return;
    }
    this.renderClusters(clusters);
    this.renderRuns(runs);
  }

  private renderClusters(result: PromiseSettledResult<ICluster[]>): void {
    const state =
      result.status === 'fulfilled'
        ? JSON.stringify(result.value)
        : `error:${errorText(result.reason)}`;
    if (state === this.shownClusters) {
      return;
    }
    this.shownClusters = state;
    if (result.status === 'rejected') {
      this.clusters.replaceChildren(
        element('div', 'jp-mlcloud-error', `Cannot list clusters: ${errorText(result.reason)}`)
      );
    } else if (result.value.length === 0) {
      this.clusters.replaceChildren(element('div', 'jp-mlcloud-empty', EMPTY_MESSAGE));
    } else {
      const names = new Set(result.value.map(c => c.name));
      for (const name of [...this.scaleDrafts.keys()].filter(n => !names.has(n))) {
        this.scaleDrafts.delete(name);
      }
      const focused = this.focusedScaleBox();
      this.clusters.replaceChildren(...result.value.map(c => this.renderCluster(c)));
      if (focused) {
        this.scaleBox(focused)?.focus();
      }
    }
  }

  /** The cluster whose scale box has the keyboard focus, if any. */
  private focusedScaleBox(): string | undefined {
    const active = document.activeElement;
    if (!(active instanceof HTMLInputElement) || !this.clusters.contains(active)) {
      return undefined;
    }
    return active.closest<HTMLElement>('.jp-mlcloud-cluster')?.dataset.clusterName;
  }

  private scaleBox(clusterName: string): HTMLInputElement | undefined {
    for (const card of Array.from(
      this.clusters.querySelectorAll<HTMLElement>('.jp-mlcloud-cluster')
    )) {
      if (card.dataset.clusterName === clusterName) {
        return card.querySelector<HTMLInputElement>('.jp-mlcloud-scale-to') ?? undefined;
      }
    }
    return undefined;
  }

  private renderRuns(result: PromiseSettledResult<IRun[]>): void {
    const state =
      result.status === 'fulfilled'
        ? JSON.stringify(result.value)
        : `error:${errorText(result.reason)}`;
    if (state === this.shownRuns) {
      return;
    }
    this.shownRuns = state;
    if (result.status === 'rejected') {
      this.runs.replaceChildren(
        element('div', 'jp-mlcloud-runs-error', `Cannot list runs: ${errorText(result.reason)}`)
      );
    } else if (result.value.length === 0) {
      this.listedRuns = [];
      this.runs.replaceChildren(element('div', 'jp-mlcloud-runs-empty', NO_RUNS_MESSAGE));
    } else {
      this.listedRuns = result.value;
      const listed = new Set(result.value.map(r => r.run));
      for (const id of [...this.picked].filter(id => !listed.has(id))) {
        this.picked.delete(id);
      }
      this.runs.replaceChildren(
        ...result.value.map(run => renderRun(run, this.openPanel, this.picked, this.openMLflow))
      );
    }
  }

  private renderModels(result: PromiseSettledResult<IModel[]>): void {
    const state =
      result.status === 'fulfilled'
        ? JSON.stringify(result.value)
        : `error:${errorText(result.reason)}`;
    if (state === this.shownModels) {
      return;
    }
    this.shownModels = state;
    if (result.status === 'rejected') {
      this.models.replaceChildren(
        element('div', 'jp-mlcloud-models-error', `Cannot list models: ${errorText(result.reason)}`)
      );
      return;
    }
    this.listedModels = result.value;
    if (result.value.length === 0) {
      this.models.replaceChildren(element('div', 'jp-mlcloud-models-empty', NO_MODELS_MESSAGE));
      return;
    }
    const active = document.activeElement;
    const focused =
      active instanceof HTMLInputElement && this.models.contains(active)
        ? active.dataset.draftKey
        : undefined;
    this.models.replaceChildren(...result.value.map(model => this.renderModel(model)));
    if (focused !== undefined) {
      for (const box of Array.from(
        this.models.querySelectorAll<HTMLInputElement>('.jp-mlcloud-alias-name')
      )) {
        if (box.dataset.draftKey === focused) {
          box.focus();
        }
      }
    }
  }

  /** A model's card: its name and aliases, then its newest versions. */
  private renderModel(model: IModel): HTMLElement {
    const card = element('div', 'jp-mlcloud-model');
    card.dataset.modelName = model.name;
    const title = element('div', 'jp-mlcloud-model-title');
    title.appendChild(element('span', 'jp-mlcloud-model-name', model.name));
    const aliases = Object.entries(model.aliases ?? {})
      .map(([alias, version]) => `@${alias} v${version}`)
      .join(' · ');
    title.appendChild(element('span', 'jp-mlcloud-model-aliases', aliases));
    card.appendChild(title);
    for (const version of model.versions.slice(0, MAX_VERSIONS)) {
      card.appendChild(this.renderVersion(model, version));
    }
    const older = model.versions.length - MAX_VERSIONS;
    if (older > 0) {
      card.appendChild(
        mlflowLink(
          'jp-mlcloud-model-more',
          `${older} older version${older === 1 ? '' : 's'} in MLflow`,
          mlflowUrl(`/models/${encodeURIComponent(model.name)}`),
          this.openMLflow
        )
      );
    }
    return card;
  }

  /** A version's row: number (a link to MLflow), aliases, metrics, alias actions. */
  private renderVersion(model: IModel, version: IModelVersion): HTMLElement {
    const row = element('div', 'jp-mlcloud-model-version');
    row.dataset.version = String(version.version);
    const created = new Date(version.created * 1000).toLocaleString();
    row.title = `created ${created}${version.run_id ? ` by run ${version.run_id}` : ''}`;
    row.appendChild(
      mlflowLink(
        'jp-mlcloud-version-link',
        `v${version.version}`,
        mlflowVersionUrl(model.name, version.version),
        this.openMLflow
      )
    );
    for (const alias of version.aliases) {
      row.appendChild(element('span', 'jp-mlcloud-alias', `@${alias}`));
    }
    const metrics = formatMetrics(version.metrics);
    if (metrics) {
      row.appendChild(element('span', 'jp-mlcloud-version-metrics', metrics));
    }
    const actions = element('div', 'jp-mlcloud-actions');
    if (!version.aliases.includes(CHAMPION)) {
      actions.appendChild(
        button('jp-mlcloud-make-champion', 'Make champion', () =>
          this.assign(model.name, CHAMPION, version.version)
        )
      );
    }
    const key = `${model.name}\n${version.version}`;
    const name = input('jp-mlcloud-alias-name', 'alias');
    name.dataset.draftKey = key;
    name.value = this.aliasDrafts.get(key) ?? '';
    name.addEventListener('input', () => this.aliasDrafts.set(key, name.value));
    actions.appendChild(name);
    actions.appendChild(
      button('jp-mlcloud-set-alias', 'Set alias', () => {
        const alias = name.value.trim().replace(/^@/, '');
        if (!alias) {
          this.message.className = 'jp-mlcloud-message jp-mlcloud-message-error';
          this.message.textContent = 'Type an alias name first, e.g. challenger.';
          return;
        }
        this.assign(model.name, alias, version.version, key);
      })
    );
    row.appendChild(actions);
    return row;
  }

  /** Point `name@alias` at `version`, and show the model as the server answers it. */
  private assign(name: string, alias: string, version: number, draftKey?: string): void {
    void this.act(`Setting ${name}@${alias} to version ${version}`, async () => {
      const model = await setAlias(name, alias, version);
      this.modelsGeneration += 1; // a list fetched before this is stale
      if (draftKey !== undefined) {
        this.aliasDrafts.delete(draftKey);
      }
      this.renderModels({
        status: 'fulfilled',
        value: this.listedModels.map(m => (m.name === model.name ? model : m))
      });
    });
  }

  private renderEndpoints(result: PromiseSettledResult<IEndpointList>): void {
    const state =
      result.status === 'fulfilled'
        ? JSON.stringify(result.value)
        : `error:${errorText(result.reason)}`;
    if (state === this.shownEndpoints) {
      return;
    }
    this.shownEndpoints = state;
    if (result.status === 'rejected') {
      this.endpoints.replaceChildren(
        element(
          'div',
          'jp-mlcloud-endpoints-error',
          `Cannot list endpoints: ${errorText(result.reason)}`
        )
      );
      return;
    }
    this.listedEndpoints = result.value;
    const { endpoints, unreachable } = result.value;
    const keys = new Set(endpoints.map(endpointKey));
    for (const key of [...this.replicaDrafts.keys()].filter(k => !keys.has(k))) {
      this.replicaDrafts.delete(key);
    }
    const nodes: HTMLElement[] = endpoints.map(e => this.renderEndpoint(e));
    if (endpoints.length === 0) {
      nodes.push(element('div', 'jp-mlcloud-endpoints-empty', NO_ENDPOINTS_MESSAGE));
    }
    if (unreachable.length > 0) {
      nodes.push(
        element(
          'div',
          'jp-mlcloud-endpoints-unreachable',
          `Scheduler not answering: ${unreachable.join(', ')} (endpoints as last seen)`
        )
      );
    }
    const active = document.activeElement;
    const focused =
      active instanceof HTMLInputElement && this.endpoints.contains(active)
        ? active.dataset.draftKey
        : undefined;
    this.endpoints.replaceChildren(...nodes);
    if (focused !== undefined) {
      for (const box of Array.from(
        this.endpoints.querySelectorAll<HTMLInputElement>('.jp-mlcloud-endpoint-replicas-to')
      )) {
        if (box.dataset.draftKey === focused) {
          box.focus();
        }
      }
    }
  }

  /** An endpoint's card: name, cluster, URL, figures, replicas, versions, actions. */
  private renderEndpoint(endpoint: IEndpoint): HTMLElement {
    const key = endpointKey(endpoint);
    const card = element('div', 'jp-mlcloud-endpoint');
    card.dataset.endpointName = endpoint.name;
    card.dataset.clusterName = endpoint.cluster;
    card.dataset.replicas = String(endpoint.replicas);
    card.dataset.versions = endpoint.versions
      .map(v => `${v.version}:${Number(v.weight.toFixed(4))}`)
      .join(',');
    if (!endpoint.reachable) {
      card.classList.add('jp-mlcloud-endpoint-unreachable');
    }

    const title = element('div', 'jp-mlcloud-endpoint-title');
    title.appendChild(element('span', 'jp-mlcloud-endpoint-name', endpoint.name));
    title.appendChild(element('span', 'jp-mlcloud-endpoint-cluster', `on ${endpoint.cluster}`));
    card.appendChild(title);
    const url = element('code', 'jp-mlcloud-endpoint-url', endpoint.url);
    url.title = 'The endpoint URL (Open Inference Protocol v2; bearer token and TLS)';
    card.appendChild(url);
    card.appendChild(
      element(
        'div',
        'jp-mlcloud-endpoint-figures',
        endpoint.reachable ? formatEndpointFigures(endpoint) : 'scheduler not answering'
      )
    );
    const scale = [plural(endpoint.replicas, 'replica')];
    const workers = new Set(endpoint.workers).size;
    if (workers > 0) {
      scale.push(`on ${plural(workers, 'worker')}`);
    }
    if (endpoint.autoscale) {
      scale.push(`· autoscale ${endpoint.autoscale.min}:${endpoint.autoscale.max}`);
    }
    const replicas = element('div', 'jp-mlcloud-endpoint-replicas', scale.join(' '));
    replicas.title = endpoint.workers.join('\n');
    card.appendChild(replicas);
    for (const version of endpoint.versions) {
      card.appendChild(renderEndpointVersion(version, endpoint.reachable));
    }
    if (endpoint.watched) {
      card.appendChild(renderEndpointWatch(endpoint));
    }

    const actions = element('div', 'jp-mlcloud-actions');
    const size = input('jp-mlcloud-endpoint-replicas-to', 'replicas', 'number');
    size.min = '1';
    size.dataset.draftKey = key;
    size.value = this.replicaDrafts.get(key) ?? String(mainVersion(endpoint)?.replicas || 1);
    size.title = 'Replicas of the main version (the one taking the most traffic)';
    size.addEventListener('input', () => this.replicaDrafts.set(key, size.value));
    actions.appendChild(size);
    actions.appendChild(
      button('jp-mlcloud-endpoint-scale', 'Scale', () => {
        this.replicaDrafts.delete(key);
        this.change(`Scaling ${endpoint.name}`, () =>
          scaleEndpoint(endpoint.cluster, endpoint.name, Number(size.value))
        );
      })
    );
    if (endpoint.versions.length > 1) {
      actions.appendChild(
        button('jp-mlcloud-endpoint-promote', 'Promote', () =>
          this.change(`Promoting the newest version of ${endpoint.name}`, () =>
            promoteEndpoint(endpoint.cluster, endpoint.name)
          )
        )
      );
    }
    actions.appendChild(
      button('jp-mlcloud-endpoint-rollback', 'Roll back', () =>
        this.change(`Rolling ${endpoint.name} back`, () =>
          rollbackEndpoint(endpoint.cluster, endpoint.name)
        )
      )
    );
    actions.appendChild(
      button('jp-mlcloud-open-endpoint', 'Panel', () =>
        this.openPanel('endpoint', `${endpoint.cluster}:${endpoint.name}`)
      )
    );
    card.appendChild(actions);
    return card;
  }

  /** Change an endpoint, and show it as the server answers it. */
  private change(what: string, action: () => Promise<IEndpoint>): void {
    void this.act(what, async () => {
      const changed = await action();
      this.endpointsGeneration += 1; // a list fetched before this is stale
      const { endpoints, unreachable } = this.listedEndpoints;
      this.renderEndpoints({
        status: 'fulfilled',
        value: {
          endpoints: endpoints.map(e => (endpointKey(e) === endpointKey(changed) ? changed : e)),
          unreachable
        }
      });
    });
  }

  /** Run an action, show its outcome (the server's one sentence on failure), refresh. */
  private async act(what: string, action: () => Promise<unknown>): Promise<void> {
    this.message.className = 'jp-mlcloud-message';
    this.message.textContent = `${what}...`;
    try {
      await action();
      this.message.textContent = `${what}: done.`;
    } catch (reason) {
      this.message.className = 'jp-mlcloud-message jp-mlcloud-message-error';
      this.message.textContent = `${what} failed: ${errorText(reason)}`;
    }
    if (!this.isDisposed) {
      await this.refresh();
    }
  }

  private newClusterForm(): HTMLElement {
    const form = element('div', 'jp-mlcloud-new');
    form.appendChild(element('div', 'jp-mlcloud-section', 'New cluster'));
    const name = input('jp-mlcloud-new-name', 'name (optional)');
    const workers = input('jp-mlcloud-new-workers', 'workers', 'number');
    workers.min = '1';
    const adapt = input('jp-mlcloud-new-adapt', 'adapt MIN:MAX (optional)');
    const kind = element('select', 'jp-mlcloud-input jp-mlcloud-new-kind') as HTMLSelectElement;
    kind.setAttribute('aria-label', 'worker kind');
    for (const [value, label] of [
      ['auto', 'GPU if present'],
      ['cpu', 'CPU'],
      ['gpu', 'GPU']
    ]) {
      const option = document.createElement('option');
      option.value = value;
      option.textContent = label;
      kind.appendChild(option);
    }
    form.append(name, workers, adapt, kind);
    form.appendChild(
      button('jp-mlcloud-start', 'Start', () => {
        const options: IStartOptions = {};
        if (name.value.trim()) {
          options.name = name.value.trim();
        }
        if (workers.value) {
          options.workers = Number(workers.value);
        }
        if (adapt.value.trim()) {
          options.adapt = adapt.value.trim();
        }
        if (kind.value !== 'auto') {
          options.gpu = kind.value === 'gpu';
        }
        void this.act('Starting a cluster', () => startCluster(options));
      })
    );
    return form;
  }

  /** One cluster's card: name and kind, figures, address, owner, dashboard, actions. */
  private renderCluster(cluster: ICluster): HTMLElement {
    const card = element('div', 'jp-mlcloud-cluster');
    card.dataset.clusterName = cluster.name;

    const title = element('div', 'jp-mlcloud-cluster-title');
    title.appendChild(element('span', 'jp-mlcloud-cluster-name', cluster.name));
    title.appendChild(element('span', 'jp-mlcloud-cluster-kind', cluster.kind));
    card.appendChild(title);

    const figures = element('div', 'jp-mlcloud-cluster-figures');
    const cells: [string, string, string][] =
      cluster.reachable === false
        ? [
            cluster.status === 'starting'
              ? ['status', 'starting', '']
              : [
                  'status',
                  cluster.tls ? 'TLS' : 'unreachable',
                  cluster.tls ? 'figures need certificates' : 'scheduler not answering'
                ]
          ]
        : [
            ['workers', count(cluster.workers), 'workers'],
            ['threads', count(cluster.threads), 'threads'],
            ['memory', formatBytes(cluster.memory), 'memory'],
            ['gpus', count(cluster.gpus ?? 0), 'GPUs']
          ];
    for (const [key, value, label] of cells) {
      const cell = element('span', `jp-mlcloud-figure jp-mlcloud-${key}`);
      cell.appendChild(element('b', '', value));
      if (label) {
        cell.appendChild(document.createTextNode(` ${label}`));
      }
      figures.appendChild(cell);
    }
    card.appendChild(figures);

    const details = element('div', 'jp-mlcloud-cluster-details');
    details.appendChild(element('code', 'jp-mlcloud-address', cluster.address ?? 'no address'));
    const about = [cluster.status, cluster.owner, `pid ${cluster.pid}`].filter(Boolean);
    details.appendChild(element('span', 'jp-mlcloud-owner', ` · ${about.join(' · ')}`));
    card.appendChild(details);

    const actions = element('div', 'jp-mlcloud-actions');
    if (cluster.dashboard && isWebAddress(cluster.dashboard)) {
      const link = element('a', 'jp-mlcloud-dashboard', 'Dashboard') as HTMLAnchorElement;
      link.href = cluster.dashboard;
      link.target = '_blank';
      link.rel = 'noopener noreferrer';
      link.title = cluster.dashboard;
      actions.appendChild(link);
    }
    actions.appendChild(
      button('jp-mlcloud-open-resources', 'Resources', () =>
        this.openPanel('resources', cluster.name)
      )
    );
    actions.appendChild(
      button('jp-mlcloud-insert-connect', 'Insert connect code', () => {
        void this.act(`Inserting code for ${cluster.name}`, () => this.insertConnect(cluster.name));
      })
    );
    if (cluster.owner === 'jupyter-server') {
      // Clusters of other processes (kernels, scripts) are managed where they were started.
      const size = input('jp-mlcloud-scale-to', 'workers', 'number');
      size.min = '0';
      // A redraw (figures changed) keeps what the user is typing.
      size.value = this.scaleDrafts.get(cluster.name) ?? String(cluster.workers ?? 1);
      size.addEventListener('input', () => this.scaleDrafts.set(cluster.name, size.value));
      actions.appendChild(size);
      actions.appendChild(
        button('jp-mlcloud-scale', 'Scale', () => {
          this.scaleDrafts.delete(cluster.name);
          void this.act(`Scaling ${cluster.name}`, () =>
            scaleCluster(cluster.name, Number(size.value))
          );
        })
      );
      const range = input('jp-mlcloud-adapt-range', 'MIN:MAX');
      actions.appendChild(range);
      actions.appendChild(
        button('jp-mlcloud-adapt', 'Adapt', () => {
          void this.act(`Adapting ${cluster.name}`, () => {
            const match = /^\s*(\d+)\s*:\s*(\d+)\s*$/.exec(range.value);
            if (!match) {
              throw new Error(`adapt needs MIN:MAX, e.g. 1:4, got '${range.value}'.`);
            }
            return adaptCluster(cluster.name, Number(match[1]), Number(match[2]));
          });
        })
      );
      actions.appendChild(
        button('jp-mlcloud-shutdown', 'Shut down', () => {
          void this.act(`Shutting down ${cluster.name}`, () => shutDownCluster(cluster.name));
        })
      );
    }
    if (actions.childElementCount > 0) {
      card.appendChild(actions);
    }
    return card;
  }
}

/** A watched endpoint's drift (the features that moved most) and its newest alert. */
function renderEndpointWatch(endpoint: IEndpoint): HTMLElement {
  const box = element('div', 'jp-mlcloud-endpoint-watch');
  const drift = endpoint.drift;
  let text = 'drift: not checked yet';
  if (drift) {
    const moved = drift.top
      .filter(([feature]) => drift.drifted.includes(feature))
      .map(([feature, effect]) => `${feature} (${effect.toFixed(2)})`);
    text = moved.length
      ? `drift in ${plural(drift.drifted.length, 'feature')}: ${moved.join(', ')}`
      : 'no drift';
  }
  const line = element('div', 'jp-mlcloud-endpoint-drift', text);
  line.title =
    'Effect size (Wasserstein distance in reference standard deviations) of the features that drifted most';
  box.appendChild(line);
  const alerts = endpoint.alerts ?? [];
  if (alerts.length) {
    const newest = alerts[alerts.length - 1];
    const alert = element('div', 'jp-mlcloud-endpoint-alert', `⚠ ${newest.message}`);
    alert.title = new Date(newest.time * 1000).toLocaleString();
    box.appendChild(alert);
  }
  return box;
}

/** Endpoints are named per cluster. */
function endpointKey(endpoint: IEndpoint): string {
  return `${endpoint.cluster}\n${endpoint.name}`;
}

/** The version scaling acts on: the most traffic, the newest on a tie (as the server picks). */
function mainVersion(endpoint: IEndpoint): IEndpointVersion | undefined {
  let main: IEndpointVersion | undefined;
  for (const version of endpoint.versions) {
    if (
      !main ||
      version.weight > main.weight ||
      (version.weight === main.weight && version.version > main.version)
    ) {
      main = version;
    }
  }
  return main;
}

/** One version's row: number, share of the traffic, replicas, figures. */
function renderEndpointVersion(version: IEndpointVersion, reachable: boolean): HTMLElement {
  const row = element('div', 'jp-mlcloud-endpoint-version');
  row.dataset.version = String(version.version);
  row.dataset.weight = String(version.weight);
  row.dataset.replicas = String(version.replicas);
  if (version.source) {
    row.title = `serves ${version.source}`;
  }
  row.appendChild(element('b', 'jp-mlcloud-endpoint-version-number', `v${version.version}`));
  row.appendChild(
    element('span', 'jp-mlcloud-endpoint-weight', ` ${Math.round(version.weight * 100)}%`)
  );
  const about = [plural(version.replicas, 'replica')];
  if (reachable) {
    about.push(formatEndpointFigures(version));
  }
  row.appendChild(element('span', 'jp-mlcloud-endpoint-version-detail', ` · ${about.join(' · ')}`));
  return row;
}

/** One run's row: a tick for overlays, id, status, cluster, last step and metrics, and a link
 * to its MLflow run once it has one. */
function renderRun(
  run: IRun,
  openPanel: PanelOpener,
  picked: Set<string>,
  openMLflow: MLflowOpener
): HTMLElement {
  const row = element('div', 'jp-mlcloud-run');
  row.dataset.runId = run.run;
  row.dataset.runStatus = run.status;
  if (/^[a-z-]+$/.test(run.status)) {
    row.classList.add(`jp-mlcloud-run-${run.status}`); // e.g. jp-mlcloud-run-error
  }
  const pick = element('input', 'jp-mlcloud-run-pick') as HTMLInputElement;
  pick.type = 'checkbox';
  pick.checked = picked.has(run.run);
  pick.title = 'Overlay this run with the other ticked runs';
  pick.setAttribute('aria-label', `overlay run ${run.run}`);
  pick.addEventListener('change', () => {
    if (pick.checked) {
      picked.add(run.run);
    } else {
      picked.delete(run.run);
    }
  });
  row.appendChild(pick);
  row.appendChild(element('span', 'jp-mlcloud-run-id', run.run));
  row.appendChild(element('span', 'jp-mlcloud-run-status', run.status));
  row.appendChild(button('jp-mlcloud-open-loss', 'Loss', () => openPanel('loss', run.run)));
  if (run.mlflow?.run_id && run.mlflow.experiment_id) {
    const link = mlflowLink(
      'jp-mlcloud-run-mlflow',
      'MLflow',
      mlflowRunUrl(run.mlflow),
      openMLflow
    );
    link.title = `MLflow run ${run.mlflow.run_id}`;
    row.appendChild(link);
  }
  const metrics = formatMetrics(run.last);
  row.appendChild(
    element(
      'div',
      'jp-mlcloud-run-detail',
      `${run.cluster} · step ${count(run.step)}${metrics ? ` · ${metrics}` : ''}` +
        (run.reachable === false ? ' · scheduler not answering' : '')
    )
  );
  if (run.reachable === false) {
    row.classList.add('jp-mlcloud-run-unreachable');
  }
  return row;
}
