import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { LabIcon } from '@jupyterlab/ui-components';

import { MLCloudSidebar } from './sidebar';

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <path class="jp-icon3" fill="#616161" d="M19 18H6a4 4 0 0 1-.6-7.96A6 6 0 0 1 17.2 8.1 5 5 0 0 1 19 18z"/>
</svg>`;

export const cloudIcon = new LabIcon({ name: 'jupyter-mlcloud:cloud', svgstr: ICON_SVG });

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-mlcloud:plugin',
  description: 'ML Cloud sidebar: Dask clusters for distributed PyTorch.',
  autoStart: true,
  optional: [ILayoutRestorer],
  activate: (app: JupyterFrontEnd, restorer: ILayoutRestorer | null) => {
    const sidebar = new MLCloudSidebar();
    sidebar.title.icon = cloudIcon;
    app.shell.add(sidebar, 'left', { rank: 200 });
    if (restorer) {
      restorer.add(sidebar, sidebar.id);
    }
  }
};

export default plugin;
