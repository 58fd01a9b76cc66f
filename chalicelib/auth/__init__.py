"""Users, passwords and tokens: register, login, refresh, me."""
