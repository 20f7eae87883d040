"""The notebooks' views: plotly figures, ipywidgets dashboards, the headless runner, the
bring-your-own-model helpers. Only notebooks and the command line import this package."""
