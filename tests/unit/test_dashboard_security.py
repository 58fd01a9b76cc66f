"""The dashboard's security invariants, read from its files: a patched js-yaml, and a site
that needs nothing a strict Content-Security-Policy forbids."""

from __future__ import annotations

import json
import re
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
SITE_DIR = PROJECT_DIR / "dashboard"
JS_YAML = SITE_DIR / "vendor" / "js-yaml.js"
# CVE-2025-64718 (prototype pollution through the YAML merge key `<<`): fixed in 4.1.1.
JS_YAML_FIXED = (4, 1, 1)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_vendored_js_yaml_is_a_patched_release() -> None:
    banner = next(line for line in JS_YAML.read_text().splitlines() if line.strip())
    found = re.fullmatch(r"/\*! js-yaml (\d+\.\d+\.\d+) \S+ @license MIT \*/", banner)
    assert found, f"no js-yaml version banner in {JS_YAML}: {banner!r}"
    assert _version(found.group(1)) >= JS_YAML_FIXED, (
        f"js-yaml {found.group(1)} is affected by CVE-2025-64718: vendor 4.1.1 or later"
    )
    assert (SITE_DIR / "vendor" / "js-yaml.LICENSE.txt").read_text().startswith("(The MIT License)")


# What the Content-Security-Policy forbids (no 'unsafe-inline', no 'unsafe-eval'), and the
# DOM sinks that would turn API data into markup: none may appear in the site.
FORBIDDEN_IN_SCRIPTS = {
    "eval(": re.compile(r"\beval\s*\("),
    "new Function": re.compile(r"\bnew\s+Function\b|\bFunction\s*\(\s*['\"`]"),
    "a string timer": re.compile(r"\bset(?:Timeout|Interval)\s*\(\s*['\"`]"),
    "innerHTML / outerHTML": re.compile(r"\.(?:inner|outer)HTML\b"),
    "insertAdjacentHTML": re.compile(r"\binsertAdjacentHTML\b"),
    "document.write": re.compile(r"\bdocument\.write(?:ln)?\b"),
    "a javascript: URL": re.compile(r"javascript:", re.IGNORECASE),
    "an event handler or style attribute": re.compile(
        r"setAttribute\(\s*['\"`](?:on[a-z]+|style)['\"`]", re.IGNORECASE
    ),
}


def parse_csp(policy: str) -> dict[str, list[str]]:
    """`default-src 'none'; script-src 'self'` -> {"default-src": ["'none'"], …}."""
    directives: dict[str, list[str]] = {}
    for part in policy.split(";"):
        name, *sources = part.split()
        assert name not in directives, f"{name} given twice"
        directives[name.lower()] = sources
    return directives


def meta_csp() -> str:
    html = (SITE_DIR / "index.html").read_text()
    found = re.findall(
        r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', html, re.IGNORECASE
    )
    assert len(found) == 1, "index.html carries one Content-Security-Policy meta element"
    return found[0]


def test_no_script_needs_inline_code_eval_or_markup_from_strings() -> None:
    scripts = sorted(SITE_DIR.rglob("*.js"))
    assert len(scripts) > 10
    for path in scripts:
        text = path.read_text()
        for what, pattern in FORBIDDEN_IN_SCRIPTS.items():
            match = pattern.search(text)
            assert not match, f"{path.relative_to(PROJECT_DIR)}: {what} ({match.group(0)!r})"


def test_index_html_has_no_inline_script_handler_or_style() -> None:
    html = (SITE_DIR / "index.html").read_text()
    for tag in re.findall(r"<script\b[^>]*>", html, re.IGNORECASE):
        assert re.search(r'\ssrc="[^"]+"', tag), f"inline script: {tag}"
    assert not re.search(r"<script\b[^>]*>(?!\s*</script>)", html), "a script with a body"
    assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE), "an inline event handler"
    assert not re.search(r"\sstyle\s*=|<style\b", html, re.IGNORECASE), "inline style"
    assert "javascript:" not in html.lower()
    # The policy must come before what it governs.
    assert html.index("Content-Security-Policy") < min(html.index("<script"), html.index("<link"))


def test_the_meta_policy_allows_scripts_from_the_site_alone() -> None:
    policy = parse_csp(meta_csp())
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    assert policy["form-action"] == ["'none'"]
    # Any API config.json may name: the loopback API of `make dev`, or a deployed https one;
    # main.js narrows it to the configured API's origin once config.json is read.
    assert policy["connect-src"] == ["'self'", "http://127.0.0.1:*", "http://localhost:*", "https:"]
    # Ignored in a meta element (the CloudFront header carries it).
    assert "frame-ancestors" not in policy
    assert not any("unsafe" in source for sources in policy.values() for source in sources)


def template_csp() -> str:
    """The Content-Security-Policy CloudFront sends in AWS (infra/template.json)."""
    template = json.loads((PROJECT_DIR / "infra" / "template.json").read_text())
    policy = template["Resources"]["DashboardResponseHeadersPolicy"]["Properties"]
    headers = policy["ResponseHeadersPolicyConfig"]["SecurityHeadersConfig"]
    value = headers["ContentSecurityPolicy"]["ContentSecurityPolicy"]
    assert headers["ContentSecurityPolicy"]["Override"] is True
    return str(value["Fn::Sub"] if isinstance(value, dict) else value)


def test_the_cloudfront_policy_and_the_meta_policy_agree_on_what_may_run() -> None:
    """In AWS the page has both policies; a browser enforces each, so they must not disagree
    about what the site needs. The header adds what only a header can carry."""
    header, meta = parse_csp(template_csp()), parse_csp(meta_csp())
    for directive in (
        "default-src",
        "script-src",
        "style-src",
        "img-src",
        "object-src",
        "base-uri",
        "form-action",
    ):
        assert header.get(directive) == meta[directive], directive
    assert set(header) - set(meta) == {"frame-ancestors"}
    assert header["frame-ancestors"] == ["'none'"]
    # The header admits the region's API Gateway hosts (not the stack's own API: see
    # docs/security-dashboard.md), which the meta policy's https: covers.
    assert header["connect-src"] == [
        "'self'",
        "https://*.execute-api.${AWS::Region}.${AWS::URLSuffix}",
    ]
    assert "https:" in meta["connect-src"]
    assert not any("unsafe" in source for sources in header.values() for source in sources)
