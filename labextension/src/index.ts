import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, IFrame, MainAreaWidget } from '@jupyterlab/apputils';
import { PageConfig, URLExt } from '@jupyterlab/coreutils';

import { cloudIcon } from './icon';
import { MLCloudSidebar, PanelKind } from './sidebar';

/** The part of a notebook panel the "insert connect code" action touches. */
interface INotebookLike {
  id: string;
  content?: {
    activeCell?: { model: { sharedModel: { setSource(source: string): void } } } | null;
  };
}

/** Show the ML Cloud panel (and refresh it). */
export const OPEN_COMMAND = 'jupyter-mlcloud:open';

/** The BokehJS files the notebook loss panels (`run.monitor()`) need, in load order. */
const BOKEHJS = ['bokeh.min.js', 'bokeh-widgets.min.js'];

/**
 * Load BokehJS into the page, from this server's `/mlcloud/bokeh/static` (never a CDN), so
 * that the loss panels kernels show in notebook cells (Bokeh documents in `jupyter_bokeh`
 * widgets) can render. Skipped when the page already has BokehJS.
 */
function loadBokehJS(): void {
  if ((window as unknown as { Bokeh?: unknown }).Bokeh) {
    return;
  }
  const root = URLExt.join(PageConfig.getBaseUrl(), 'mlcloud', 'bokeh', 'static', 'js');
  const next = (files: string[]): void => {
    if (files.length === 0) {
      return;
    }
    const script = document.createElement('script');
    script.src = URLExt.join(root, files[0]);
    script.onload = () => next(files.slice(1));
    script.onerror = () => console.warn(`ML Cloud: could not load ${script.src}`);
    document.head.appendChild(script);
  };
  next(BOKEHJS);
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-mlcloud:plugin',
  description: 'ML Cloud sidebar: Dask clusters for distributed PyTorch.',
  autoStart: true,
  optional: [ILayoutRestorer, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null
  ) => {
    // Each panel is a page of the server extension, shown in a tab; one tab per panel.
    const tabs = new Map<string, MainAreaWidget<IFrame>>();
    const labels: { [kind in PanelKind]: string } = {
      loss: 'Loss',
      resources: 'Resources',
      endpoint: 'Endpoint',
      pipeline: 'Pipeline'
    };
    const openPanel = (kind: PanelKind, target: string): void => {
      const key = `${kind}:${target}`;
      let tab = tabs.get(key);
      if (!tab || tab.isDisposed) {
        const frame = new IFrame({ sandbox: ['allow-scripts', 'allow-same-origin'] });
        frame.url = URLExt.join(
          PageConfig.getBaseUrl(),
          'mlcloud',
          'panels',
          kind,
          encodeURIComponent(target)
        );
        tab = new MainAreaWidget({ content: frame });
        tab.id = `mlcloud-panel-${kind}-${target}`;
        tab.title.label = `${labels[kind]}: ${target.split(',').join(', ')}`;
        tab.title.closable = true;
        tab.title.icon = cloudIcon;
        tab.addClass('jp-mlcloud-panel');
        tabs.set(key, tab);
        app.shell.add(tab, 'main');
      }
      app.shell.activateById(tab.id);
    };
    // A new cell under the active one, attaching the notebook's kernel to the cluster.
    // (Through the notebook's own command, so the extension needs no notebook package.)
    const insertConnect = async (name: string): Promise<void> => {
      const current = app.shell.currentWidget as unknown as INotebookLike | null;
      if (!current?.content || !('activeCell' in current.content)) {
        throw new Error('open a notebook first');
      }
      await app.commands.execute('notebook:insert-cell-below');
      current.content.activeCell?.model.sharedModel.setSource(
        `%load_ext jupyter_mlcloud\n%mlcloud connect ${name}`
      );
      app.shell.activateById(current.id);
    };
    // The MLflow UI (proxied by the Jupyter server) in one tab, moved to each page asked for.
    let mlflowTab: MainAreaWidget<IFrame> | null = null;
    const openMLflow = (url: string): void => {
      if (!mlflowTab || mlflowTab.isDisposed) {
        const frame = new IFrame({
          sandbox: [
            'allow-scripts',
            'allow-same-origin',
            'allow-forms',
            'allow-popups',
            'allow-downloads',
            'allow-modals'
          ]
        });
        mlflowTab = new MainAreaWidget({ content: frame });
        mlflowTab.id = 'mlcloud-mlflow';
        mlflowTab.title.label = 'MLflow';
        mlflowTab.title.closable = true;
        mlflowTab.title.icon = cloudIcon;
        mlflowTab.addClass('jp-mlcloud-mlflow');
        app.shell.add(mlflowTab, 'main');
      }
      mlflowTab.content.url = url;
      app.shell.activateById(mlflowTab.id);
    };
    loadBokehJS();
    const sidebar = new MLCloudSidebar(openPanel, insertConnect, openMLflow);
    sidebar.title.icon = cloudIcon;
    app.shell.add(sidebar, 'left', { rank: 200 });
    if (restorer) {
      restorer.add(sidebar, sidebar.id);
    }

    app.commands.addCommand(OPEN_COMMAND, {
      label: 'Show ML Cloud Clusters',
      caption: 'Open the ML Cloud sidebar',
      icon: cloudIcon,
      execute: () => {
        app.shell.activateById(sidebar.id);
        return sidebar.refresh();
      }
    });
    if (palette) {
      palette.addItem({ command: OPEN_COMMAND, category: 'ML Cloud' });
    }
  }
};

export default plugin;
