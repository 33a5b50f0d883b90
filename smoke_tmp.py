import time, torch, cProfile, pstats
from metaattn_viz.routing import RoutedModel
from metaattn_viz.settings import RoutingSettings
r = RoutedModel.load()
p="Hello world, this is a test of the routing."
tr = r.route(p, RoutingSettings(budget=0.3), max_new_tokens=2)
cProfile.run("r.route(p, RoutingSettings(budget=0.3), max_new_tokens=8)", "/tmp/prof")
pstats.Stats("/tmp/prof").sort_stats("cumtime").print_stats(25)
