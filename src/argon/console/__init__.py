"""The web console: server-rendered pages over the control plane, mounted beside the API by the
platform (`argon.platform`); it imports nothing of the API.

`routes` mounts everything and holds sign-in, the projects list and a project's dashboard; the
`pages_*` modules hold the other pages (branches, roles, settings, SQL editor, monitoring,
account); `web` the dependencies, rendering and HTML error handling; `auth` the sign-in links,
sessions and CSRF tokens; `dashboard`, `snippets`, `charts`, `display` and `sql` what the pages
show.
"""
