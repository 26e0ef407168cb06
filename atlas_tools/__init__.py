"""Tools around the Flower app, outside its bundle (FAB): atlas-run, atlas-deploy, atlas-report, atlas-export,
and the in-process grid for tests and benchmarks. The app (atlas_flwr/, strategies/) never imports them."""
