"""User tools built on the core (``ops`` -> ``nn`` -> ``integration``): each module has a ``main(argv)``.

``pst-yolo demo | bench | heatmap | convert | sizes`` dispatch here; the core never imports this package.
"""
