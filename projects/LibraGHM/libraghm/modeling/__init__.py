"""LibraGHM modeling."""
# <imports>
# </imports>
