"""LibraGHM sampling."""
# <imports>
# </imports>
