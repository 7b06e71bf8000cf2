"""What local models write, read back into the shape of the API: tool calls written as
text in the content (``text_calls``) and thinking in tags at the start of the content
(``think_tags``).

Pure: fed the content a model server sent (whole, or delta by delta), these modules
return values and do no I/O. They sit between the upstream's reply and the translators
of both APIs: an upstream reply's content goes through ``think_tags`` first (the
reasoning comes off the front), then through ``text_calls`` (calls come out of the
answer). ``lenient_json`` and ``call_formats`` are their parts.
"""
