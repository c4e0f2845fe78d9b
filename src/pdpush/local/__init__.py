"""Local tooling around the library: start vLLM P and D servers on this machine (`cluster`,
`pdpush up`), talk to D as a client would (`client`, `pdpush demo`), and make the tiny model that
lets all of it run with no download (`tinymodel`). The connector itself never imports from here."""
