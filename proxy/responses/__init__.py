"""The Responses API, served by lmbridge itself on top of the upstream's chat completions.

Data flow of ``POST /v1/responses``: ``request`` validates the body ->
``service`` loads the stored chain or conversation -> ``render`` turns items,
tools and settings into a chat completion request -> the upstream answers ->
``builder`` turns the answer (streamed or not) into output items, events and
the Response object -> ``service`` stores it and ``routes`` send it.
``request``, ``render`` and ``builder`` are pure: no I/O, no aiohttp.
"""
