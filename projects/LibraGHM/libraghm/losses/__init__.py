"""LibraGHM losses."""
# <imports>
# </imports>
