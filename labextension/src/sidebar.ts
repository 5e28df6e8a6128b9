import { Widget } from '@lumino/widgets';

import { ICluster, listClusters } from './api';

const REFRESH_MS = 3000;

function formatBytes(bytes: number | null): string {
  if (!bytes) {
    return '-';
  }
  return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
}

function element(tag: string, className: string, text?: string): HTMLElement {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) {
    node.textContent = text; // never innerHTML: names and addresses come from files
  }
  return node;
}

/** The "ML Cloud" panel: every cluster on this machine, refreshed every few seconds. */
export class MLCloudSidebar extends Widget {
  private list: HTMLElement;
  private timer: number | undefined;

  constructor() {
    super();
    this.id = 'mlcloud-sidebar';
    this.addClass('jp-mlcloud-sidebar');
    this.title.caption = 'ML Cloud';

    const header = element('div', 'jp-mlcloud-header');
    header.appendChild(element('span', 'jp-mlcloud-title', 'ML Cloud'));
    const refresh = element('button', 'jp-mlcloud-refresh jp-Button', 'Refresh');
    refresh.title = 'Refresh the cluster list';
    refresh.addEventListener('click', () => void this.refresh());
    header.appendChild(refresh);
    this.node.appendChild(header);

    this.node.appendChild(element('div', 'jp-mlcloud-section', 'Clusters'));
    this.list = element('div', 'jp-mlcloud-clusters');
    this.node.appendChild(this.list);
  }

  protected onAfterAttach(): void {
    void this.refresh();
    this.timer = window.setInterval(() => {
      if (this.isVisible) {
        void this.refresh();
      }
    }, REFRESH_MS);
  }

  protected onBeforeDetach(): void {
    window.clearInterval(this.timer);
    this.timer = undefined;
  }

  dispose(): void {
    window.clearInterval(this.timer);
    super.dispose();
  }

  /** Fetch the clusters and redraw the list. */
  async refresh(): Promise<void> {
    let clusters: ICluster[];
    try {
      clusters = await listClusters();
    } catch (reason) {
      this.list.replaceChildren(
        element('div', 'jp-mlcloud-error', `Cannot list clusters: ${(reason as Error).message}`)
      );
      return;
    }
    if (clusters.length === 0) {
      this.list.replaceChildren(
        element('div', 'jp-mlcloud-empty', 'No clusters yet. Start one in a notebook with %mlcloud up')
      );
      return;
    }
    this.list.replaceChildren(...clusters.map(renderCluster));
  }
}

function renderCluster(cluster: ICluster): HTMLElement {
  const card = element('div', 'jp-mlcloud-cluster');
  card.dataset.clusterName = cluster.name;

  const title = element('div', 'jp-mlcloud-cluster-title');
  title.appendChild(element('span', 'jp-mlcloud-cluster-name', cluster.name));
  title.appendChild(element('span', 'jp-mlcloud-cluster-kind', cluster.kind));
  card.appendChild(title);

  const figures = element('div', 'jp-mlcloud-cluster-figures');
  const cells: [string, string][] = cluster.reachable
    ? [
        ['workers', String(cluster.workers ?? '-')],
        ['threads', String(cluster.threads ?? '-')],
        ['memory', formatBytes(cluster.memory)],
        ['GPUs', String(cluster.gpus ?? 0)]
      ]
    : [['status', cluster.tls ? 'TLS: figures hidden' : 'scheduler not answering']];
  for (const [label, value] of cells) {
    const cell = element('span', `jp-mlcloud-figure jp-mlcloud-${label.toLowerCase()}`);
    cell.appendChild(element('b', '', value));
    cell.appendChild(document.createTextNode(` ${label}`));
    figures.appendChild(cell);
  }
  card.appendChild(figures);

  const details = element('div', 'jp-mlcloud-cluster-details');
  details.appendChild(element('code', '', cluster.address ?? ''));
  details.appendChild(element('span', '', ` · ${cluster.owner} pid ${cluster.pid}`));
  card.appendChild(details);

  if (cluster.dashboard) {
    const link = element('a', 'jp-mlcloud-dashboard', 'Dashboard') as HTMLAnchorElement;
    link.href = cluster.dashboard;
    link.target = '_blank';
    link.rel = 'noopener noreferrer';
    card.appendChild(link);
  }
  return card;
}
