/**
 * JupyterLab plugin: the Djinn debugger sidebar on the right, a palette command and a notebook toolbar
 * button that open it.
 */
import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, ToolbarButton } from '@jupyterlab/apputils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';

import { DjinnPanel } from './panel';

const OPEN = 'djinn:open-sidebar';

const djinnIcon = new LabIcon({
  name: 'djinn:icon',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<path d="M4 15c0-2 2-3 4-3h6c3 0 5-2 5-4h1c0 3-2 6-6 6h-1l1 3H7l1-2c-2 0-4 1-4 2z"/>' +
    '<path d="M10 11c-1-2 0-5 3-6-1 2 1 3 0 6z"/><rect x="6" y="18" width="12" height="2" rx="1"/></g></svg>'
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'djinn-lab:sidebar',
  description: 'Djinn debugger sidebar: GPU, sessions, breakpoints and pause controls.',
  autoStart: true,
  requires: [INotebookTracker, ILabShell],
  optional: [ICommandPalette],
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker, shell: ILabShell, palette: ICommandPalette | null) => {
    const panel = new DjinnPanel(tracker, path => void app.commands.execute('docmanager:open', { path }));
    panel.title.icon = djinnIcon;
    shell.add(panel, 'right', { rank: 900 });

    app.commands.addCommand(OPEN, {
      label: 'Open the Djinn debugger sidebar',
      icon: djinnIcon,
      execute: () => shell.activateById(panel.id)
    });
    palette?.addItem({ command: OPEN, category: 'Djinn' });
    app.docRegistry.addWidgetExtension('Notebook', {
      createNew: (notebook: NotebookPanel) => {
        const button = new ToolbarButton({
          icon: djinnIcon,
          tooltip: 'Open the Djinn debugger sidebar',
          className: 'djinn-toolbar-button',
          onClick: () => void app.commands.execute(OPEN)
        });
        notebook.toolbar.insertItem(10, 'djinn', button);
        return button;
      }
    });
  }
};

export default plugin;
