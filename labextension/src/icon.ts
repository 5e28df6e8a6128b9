import { LabIcon } from '@jupyterlab/ui-components';

/** A cloud, drawn in the theme's icon colour (class jp-icon3) so it suits light and dark. */
const CLOUD_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <path class="jp-icon3" fill="#616161" d="M19 18H6a4 4 0 0 1-.6-7.96A6 6 0 0 1 17.2 8.1 5 5 0 0 1 19 18z"/>
</svg>`;

export const cloudIcon = new LabIcon({ name: 'jupyter-mlcloud:cloud', svgstr: CLOUD_SVG });
