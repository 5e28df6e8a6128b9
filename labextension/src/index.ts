import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';

import { cloudIcon } from './icon';
import { MLCloudSidebar } from './sidebar';

/** Show the ML Cloud panel (and refresh it). */
export const OPEN_COMMAND = 'jupyter-mlcloud:open';

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
    const sidebar = new MLCloudSidebar();
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
