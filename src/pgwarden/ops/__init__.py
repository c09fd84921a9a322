"""Operations on the server: the functions behind `pgwarden status`, `kill-idle`,
`queries` and `tune`. They return what they found and did; the CLI renders."""
