-- KPIs per (item, spec) for the items in temp table kpi_scope(item_id, spec_id).
-- Windows end at the item's newest stored date (not "today"), so a KPI never moves unless data does.
-- Price change reference: price_min on the latest date at least N days before the newest price date;
-- when history is shorter than N days, the oldest stored price.
-- Each trend table is read in two passes, no CTE read twice (DuckDB materialises those): its ends per item, then its
-- rows joined to the ends, the sales only over their last 30 days. {in_scope} is empty when every item is in scope
-- (Warehouse.refresh_kpis): the semi joins were a third of the time of a full recompute.
WITH
scope AS (SELECT DISTINCT item_id, spec_id FROM kpi_scope),
sales_end AS (
    SELECT item_id, spec_id, max(date) AS last_sales_date, count(*) AS history_days
    FROM tmapi.sales_trend_daily {in_scope}
    GROUP BY item_id, spec_id
),
sales_kpis AS (  -- only the last 30 days of each item reach the aggregate
    SELECT
        s.item_id, s.spec_id,
        sum(s.sales_quantity) FILTER (WHERE s.date > e.last_sales_date - 7) AS units_7d,
        sum(s.sales_quantity)                                              AS units_30d,
        sum(s.order_quantity)                                              AS orders_30d,
        count(*) FILTER (WHERE s.sales_quantity = 0)                       AS zero_sales_days_30d
    FROM tmapi.sales_trend_daily s
    JOIN sales_end e ON s.item_id = e.item_id AND s.spec_id = e.spec_id AND s.date > e.last_sales_date - 30
    GROUP BY s.item_id, s.spec_id
),
price_end AS (
    SELECT item_id, spec_id, max(date) AS last_price_date, min(date) AS first_price_date,
           min(price_min) AS lowest_price_min
    FROM tmapi.price_trend_daily {in_scope}
    WHERE price_min IS NOT NULL
    GROUP BY item_id, spec_id
),
price_marks AS (  -- one more pass: the prices at the newest and oldest dates, and the reference dates
    SELECT
        p.item_id, p.spec_id,
        max(p.price_min) FILTER (WHERE p.date = e.last_price_date)                   AS latest_price_min,
        max(p.price_max) FILTER (WHERE p.date = e.last_price_date)                   AS latest_price_max,
        arg_max(p.price_min, p.date) FILTER (WHERE p.date <= e.last_price_date - 7)  AS reference_7d,
        arg_max(p.price_min, p.date) FILTER (WHERE p.date <= e.last_price_date - 30) AS reference_30d,
        max(p.price_min) FILTER (WHERE p.date = e.first_price_date)                  AS oldest_price_min,
        max(p.date) FILTER (WHERE p.price_min = e.lowest_price_min)                  AS lowest_price_date,
        any_value(e.lowest_price_min)                                                AS lowest_price_min
    FROM tmapi.price_trend_daily p JOIN price_end e USING (item_id, spec_id)
    WHERE p.price_min IS NOT NULL
    GROUP BY p.item_id, p.spec_id
),
price_kpis AS (
    SELECT item_id, spec_id, latest_price_min, latest_price_max,
           coalesce(reference_7d, oldest_price_min) AS reference_price_7d,
           coalesce(reference_30d, oldest_price_min) AS reference_price_30d,
           lowest_price_min, lowest_price_date
    FROM price_marks
)
SELECT
    scope.item_id,
    scope.spec_id,
    greatest(se.last_sales_date, pe.last_price_date)                    AS last_observed_date,
    sk.units_7d,
    sk.units_30d,
    sk.orders_30d,
    CAST(sk.units_30d AS DECIMAL(18, 4)) / nullif(sk.orders_30d, 0)    AS units_per_order_30d,
    pk.latest_price_min,
    pk.latest_price_max,
    CAST(100 * (pk.latest_price_min - pk.reference_price_7d) / nullif(pk.reference_price_7d, 0) AS DECIMAL(18, 4))
                                                                         AS price_change_pct_7d,
    CAST(100 * (pk.latest_price_min - pk.reference_price_30d) / nullif(pk.reference_price_30d, 0) AS DECIMAL(18, 4))
                                                                         AS price_change_pct_30d,
    pk.lowest_price_min,
    pk.lowest_price_date,
    sk.zero_sales_days_30d,
    date_diff('day', CAST(timezone('Asia/Shanghai', st.publish_time) AS DATE),
              greatest(se.last_sales_date, pe.last_price_date))        AS days_since_publish,
    coalesce(se.history_days, 0)                                         AS history_days,
    now()                                                                AS computed_at
FROM scope
LEFT JOIN sales_end  se USING (item_id, spec_id)
LEFT JOIN price_end  pe USING (item_id, spec_id)
LEFT JOIN sales_kpis sk USING (item_id, spec_id)
LEFT JOIN price_kpis pk USING (item_id, spec_id)
LEFT JOIN tmapi.item_statistics st USING (item_id, spec_id)
