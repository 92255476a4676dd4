"""The risk report, by job: the verdict (`verdicts`), report.json (`document`), the tables, sentences and figure it
shows, and its two renderers (`html`, `markdown`). The `report` stage reads the committed results and calls these;
nothing here reads storage or imports torch."""
