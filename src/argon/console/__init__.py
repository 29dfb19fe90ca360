"""The web console: server-rendered pages over the control plane, mounted beside the API.

`routes` holds the pages, `web` the session dependencies and HTML error handling, `auth` the
sign-in links, sessions and CSRF tokens, `dashboard` and `snippets` what the pages show.
"""
