"""An offline page template for `dvc plots show` / `dvc plots diff`.

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN, so it is blank
without a network. `write_offline_template` writes a page with the three libraries
inlined (bundled by vl-convert), which DVC uses through its ``plots.html_template``
config.
"""

from __future__ import annotations

from pathlib import Path

VEGA_LITE = "5.21"  # DVC's templates are Vega-Lite v5 specs

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline: Vega-Lite %(version)s inlined)</title>
    <script type="text/javascript">%(bundle)s</script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def write_offline_template(path: Path) -> Path:
    """Write the page (about 0.9 MB) to ``path``; DVC fills ``{plot_divs}``."""
    import vl_convert

    bundle = vl_convert.javascript_bundle("window.vegaEmbed = vegaEmbed;", vl_version=VEGA_LITE)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE % {"version": VEGA_LITE, "bundle": bundle.replace("</script", "<\\/script")})
    return path
