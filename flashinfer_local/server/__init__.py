"""An OpenAI-compatible local server: ``protocol`` (request checks, response shapes), ``worker``
(one engine, one generation at a time, from a bounded queue) and ``app`` (the Starlette routes)."""
