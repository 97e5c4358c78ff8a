"""FunctionBench chameleon: render an HTML table of rows x cols with a page template."""

import hashlib

from chameleon import PageTemplate  # the library: fnserver puts this directory last on sys.path
from fnparams import int_param

DEFAULT_PAYLOAD = {"num_of_rows": 50, "num_of_cols": 50}
BIGTABLE_ZPT = """\
<table xmlns="http://www.w3.org/1999/xhtml"
xmlns:tal="http://xml.zope.org/namespaces/tal">
<tr tal:repeat="row python: options['table']">
<td tal:repeat="c python: row.values()">
<span tal:define="d python: c + 1"
tal:attributes="class python: 'column-' + str(d)"
tal:content="python: d" />
</td>
</tr>
</table>"""
TEMPLATE = PageTemplate(BIGTABLE_ZPT)
TEMPLATE.cook_check()  # compile now, once, rather than in the first request


def handle(payload):
    rows = int_param(payload, "num_of_rows", DEFAULT_PAYLOAD["num_of_rows"], 0, 100_000)
    cols = int_param(payload, "num_of_cols", DEFAULT_PAYLOAD["num_of_cols"], 0, 10_000)
    row = {str(i): i for i in range(cols)}
    html = TEMPLATE.render(options={"table": [row] * rows})
    return {"length": len(html), "sha256": hashlib.sha256(html.encode()).hexdigest()}
