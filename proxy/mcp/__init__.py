"""MCP: lmbridge as an MCP client running tool loops for the model.

``servers`` keeps one supervised session per configured MCP server; ``names`` maps
their tools to the names the model sees; ``loop`` runs model -> tools -> model on a
chat completion; ``results`` turns a tool result into what the model reads. The
modules named after data (``names``, ``results``) do no I/O; tool calls written as text
are read by ``proxy.model_output``.
"""
