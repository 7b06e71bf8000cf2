"""`lmbridge mcp`: the daemon as an MCP server, so that a coding assistant (Claude Code,
Claude Desktop, Cursor, LM Studio) can hand work to a local model.

The MCP server holds no model logic of its own: every tool is one or a few calls to
the daemon's HTTP API (``client``), whose answers are turned into tool results by pure
functions (``text``). ``delegate`` follows a background response's event stream for the
trace of its tool calls; ``server`` declares the tools and runs the transports.
"""
